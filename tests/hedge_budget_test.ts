/** The hedge budget (`src/upstream/hedge_budget.ts`): a token bucket of hedges per question. */

import assert from "node:assert/strict";
import { HedgeBudget } from "../src/upstream/hedge_budget.ts";

Deno.test("hedge budget: a burst of 10 at start, then `percent` hedges per 100 questions", () => {
  const budget = new HedgeBudget(5);
  let taken = 0;
  for (let i = 0; i < 20; i++) if (budget.take()) taken++;
  assert.equal(taken, HedgeBudget.BURST, "the start-up burst");
  taken = 0;
  for (let i = 0; i < 1000; i++) {
    budget.earn();
    if (budget.take()) taken++;
  }
  assert.ok(taken >= 49 && taken <= 50, `${taken} hedges for 1,000 questions at 5%`);
});

Deno.test("hedge budget: 0 percent hedges nothing, ever", () => {
  const budget = new HedgeBudget(0);
  for (let i = 0; i < 1000; i++) budget.earn();
  assert.equal(budget.take(), false);
});
