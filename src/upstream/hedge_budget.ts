/**
 * The hedge budget of an upstream set (`--hedge-budget`): how many questions may be asked of
 * a second upstream before the first answered.
 *
 * @module
 */

/**
 * Hedges earned per question and spent per hedge (a token bucket): at most `percent` of the
 * questions plus a burst of {@linkcode HedgeBudget.BURST}, which is also what it starts with,
 * so the first questions after a start (when nothing is measured yet) can be hedged too.
 *
 * @example
 * ```ts
 * import { HedgeBudget } from "./hedge_budget.ts";
 * const budget = new HedgeBudget(5); // --hedge-budget 5
 * budget.take(); // true: the start-up burst
 * budget.earn(); // each question earns 0.05 of a hedge
 * ```
 */
export class HedgeBudget {
  /** Hedges that may be spent at once before the budget refills. */
  static readonly BURST = 10;
  #tokens: number;
  readonly #rate: number;

  /** A budget of `percent` hedges per 100 questions (0: none). */
  constructor(percent: number) {
    this.#rate = percent / 100;
    this.#tokens = percent > 0 ? HedgeBudget.BURST : 0;
  }

  /** A question was asked: earns its share of a hedge. */
  earn(): void {
    const next = this.#tokens + this.#rate;
    this.#tokens = next > HedgeBudget.BURST ? HedgeBudget.BURST : next;
  }

  /** Spends a hedge; false when none is left. */
  take(): boolean {
    if (this.#tokens < 1) return false;
    this.#tokens--;
    return true;
  }
}
