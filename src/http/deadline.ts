/**
 * One deadline of a connection on the proxy's {@linkcode TimerQueue}: arming, moving and
 * disarming cost O(1) and no platform timer. The DoH connections move theirs on every
 * request (idle, request, write deadlines): with `setTimeout` that was 10% of the CPU of a
 * cached HTTP/1.1 request (V8 profile, 26k requests/s).
 *
 * @module
 */

import type { Timed, TimerQueue } from "../timers.ts";

/**
 * A deadline that calls `expire(reason)` once when due.
 *
 * @example
 * ```ts
 * import { Deadline } from "./deadline.ts";
 * import { ManualClock, TimerQueue } from "../timers.ts";
 * const clock = new ManualClock();
 * const timers = new TimerQueue(clock);
 * const deadline = new Deadline(timers, (reason) => console.log(reason));
 * deadline.arm(100, "idle");
 * clock.advance(100); // logs "idle"
 * timers.close();
 * ```
 */
export class Deadline implements Timed {
  /** Written by the timer queue. */
  timerAt: number = 0;
  /** Written by the timer queue. */
  timerIndex: number = -1;
  /** Written by the timer queue. */
  timerSlot: number = -1;
  readonly #timers: TimerQueue;
  readonly #expire: (reason: string) => void;
  #reason = "";

  /** A disarmed deadline on `timers`. */
  constructor(timers: TimerQueue, expire: (reason: string) => void) {
    this.#timers = timers;
    this.#expire = expire;
  }

  /** Due `ms` from now, for `reason` (moves it when armed). */
  arm(ms: number, reason: string): void {
    this.#reason = reason;
    this.#timers.schedule(this, this.#timers.clock.now() + ms);
  }

  /** Not due at all. */
  disarm(): void {
    this.#timers.cancel(this);
  }

  /** Called by the timer queue. */
  onTimer(): void {
    this.#expire(this.#reason);
  }
}
