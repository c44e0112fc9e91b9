/**
 * Time for the whole proxy: a {@linkcode Clock} (real, or manual in tests) and a
 * {@linkcode TimerQueue}, a binary heap of deadlines driven by one platform timer.
 *
 * Every client job, upstream request and exchange has its own deadline, and most of them are
 * cancelled long before they fire (the answer came first). A platform timer per deadline would
 * cost an op and a closure per query; a FIFO swept on an interval assumes one timeout for
 * everything and keeps finished entries until they reach its head. The heap removes an entry
 * in O(log n) the moment it is cancelled, so memory follows what is pending, not what passed.
 *
 * @module
 */

/** What {@linkcode Clock.schedule} returns: a platform timer, or a manual clock's number. */
export type TimerHandle = ReturnType<typeof setTimeout> | number;

/** Where time comes from. Tests pass a {@linkcode ManualClock}. */
export interface Clock {
  /** Milliseconds on a monotonic scale (like `performance.now()`). */
  now(): number;
  /** Calls `callback` once after about `delayMs`; returns a handle for {@linkcode cancel}. */
  schedule(callback: () => void, delayMs: number): TimerHandle;
  /** Cancels a scheduled callback. */
  cancel(handle: TimerHandle): void;
}

/**
 * The time read by the current run of JavaScript, or -1 once it ended. One query's path (UDP
 * receive, cache, forward, write) and one upstream read (every answer in it, and every client
 * waiting on them) each read the clock several times; `performance.now()` is an op and
 * costs about 0.3 us, 4% of the CPU of a query at saturation (V8 sampling profile). Time is
 * therefore read once per run of synchronous work, and forgotten when the microtasks already
 * queued have run: every reading within a run lags the true time by at most that run's length.
 */
let readAt = -1;
const forgetTime = () => {
  readAt = -1;
};

/** The real clock: `performance.now()` (once per run of synchronous work) and `setTimeout`. */
export const SYSTEM_CLOCK: Clock = {
  now: () => {
    if (readAt < 0) {
      readAt = performance.now();
      queueMicrotask(forgetTime);
    }
    return readAt;
  },
  schedule: (callback, delayMs) => setTimeout(callback, delayMs),
  cancel: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};

/**
 * A clock that moves only when told to, for tests: {@linkcode ManualClock.advance} runs every
 * callback that falls due, in time order.
 *
 * @example
 * ```ts
 * import { ManualClock } from "./timers.ts";
 * const clock = new ManualClock();
 * let fired = false;
 * clock.schedule(() => fired = true, 100);
 * clock.advance(99); // fired === false
 * clock.advance(1); // fired === true
 * ```
 */
export class ManualClock implements Clock {
  #now: number;
  #next = 1;
  readonly #pending = new Map<number, { at: number; callback: () => void }>();

  /** Starts at `start` milliseconds. */
  constructor(start = 1000) {
    this.#now = start;
  }

  /** The current time. */
  now(): number {
    return this.#now;
  }

  /** Schedules `callback` at now + `delayMs`. */
  schedule(callback: () => void, delayMs: number): number {
    const handle = this.#next++;
    this.#pending.set(handle, { at: this.#now + Math.max(0, delayMs), callback });
    return handle;
  }

  /** Forgets a scheduled callback. */
  cancel(handle: TimerHandle): void {
    if (typeof handle === "number") this.#pending.delete(handle);
  }

  /** Callbacks scheduled and not yet run. */
  get pending(): number {
    return this.#pending.size;
  }

  /** Moves time forward by `ms`, running due callbacks in order (including ones they add). */
  advance(ms: number): void {
    const target = this.#now + ms;
    for (let guard = 0; guard < 1_000_000; guard++) {
      let dueHandle = -1;
      let dueAt = Infinity;
      for (const [handle, entry] of this.#pending) {
        if (entry.at <= target && entry.at < dueAt) {
          dueAt = entry.at;
          dueHandle = handle;
        }
      }
      if (dueHandle < 0) break;
      const entry = this.#pending.get(dueHandle)!;
      this.#pending.delete(dueHandle);
      this.#now = Math.max(this.#now, entry.at);
      entry.callback();
    }
    this.#now = target;
  }
}

/**
 * Something with one deadline in a {@linkcode TimerQueue}. An object that needs several
 * deadlines (a request's hedge, retry and final deadline) keeps the earliest here and
 * re-arms itself from {@linkcode Timed.onTimer}.
 */
export interface Timed {
  /** When it is due; written by the queue. */
  timerAt: number;
  /** Position in the heap, -1 when not queued; written by the queue. */
  timerIndex: number;
  /** Called once when due (after removal from the queue). */
  onTimer(now: number): void;
}

/**
 * Deadlines in a binary min-heap, fired by one platform timer armed for the earliest.
 *
 * @example
 * ```ts
 * import { ManualClock, type Timed, TimerQueue } from "./timers.ts";
 * const clock = new ManualClock();
 * const timers = new TimerQueue(clock);
 * const job: Timed = { timerAt: 0, timerIndex: -1, onTimer: () => console.log("due") };
 * timers.schedule(job, clock.now() + 50);
 * timers.cancel(job); // answered in time
 * timers.close();
 * ```
 */
export class TimerQueue {
  /** The clock the deadlines are read from. */
  readonly clock: Clock;
  readonly #heap: Timed[] = [];
  #armedAt = Infinity;
  #handle: TimerHandle | null = null;
  #closed = false;
  readonly #fire = () => this.#run();

  /** Creates an empty queue on `clock`. */
  constructor(clock: Clock = SYSTEM_CLOCK) {
    this.clock = clock;
  }

  /** Entries waiting. */
  get size(): number {
    return this.#heap.length;
  }

  /** Queues `entry` at time `at`, moving it if it was queued already. */
  schedule(entry: Timed, at: number): void {
    if (this.#closed) return;
    if (entry.timerIndex >= 0) {
      const index = entry.timerIndex;
      const earlier = at < entry.timerAt;
      entry.timerAt = at;
      if (earlier) this.#up(index);
      else this.#down(index);
    } else {
      entry.timerAt = at;
      entry.timerIndex = this.#heap.length;
      this.#heap.push(entry);
      this.#up(entry.timerIndex);
    }
    this.#arm();
  }

  /** Removes `entry` if queued. */
  cancel(entry: Timed): void {
    const index = entry.timerIndex;
    if (index < 0) return;
    const heap = this.#heap;
    const last = heap.pop()!;
    entry.timerIndex = -1;
    if (index < heap.length) {
      heap[index] = last;
      last.timerIndex = index;
      this.#up(index);
      this.#down(last.timerIndex);
    }
    // The platform timer stays armed; when it fires early it re-arms for the new earliest.
  }

  /** Drops every entry and the platform timer. */
  close(): void {
    this.#closed = true;
    for (const entry of this.#heap) entry.timerIndex = -1;
    this.#heap.length = 0;
    this.#disarm();
  }

  #arm(): void {
    const first = this.#heap[0];
    if (first === undefined) {
      this.#disarm();
      return;
    }
    // Re-arm only when the earliest moved earlier (or nothing is armed): under load new
    // deadlines are later than the ones queued, so this is rare.
    if (first.timerAt >= this.#armedAt) return;
    this.#disarm();
    this.#armedAt = first.timerAt;
    this.#handle = this.clock.schedule(this.#fire, Math.max(0, first.timerAt - this.clock.now()));
  }

  #disarm(): void {
    if (this.#handle !== null) this.clock.cancel(this.#handle);
    this.#handle = null;
    this.#armedAt = Infinity;
  }

  #run(): void {
    this.#handle = null;
    this.#armedAt = Infinity;
    const heap = this.#heap;
    // Bounded: each pass removes one entry; entries re-queued for "now" would loop, so anything
    // scheduled during this run at or before `now` waits for the next turn.
    const now = this.clock.now();
    let budget = heap.length;
    while (budget-- > 0 && heap.length > 0 && heap[0].timerAt <= now) {
      const entry = heap[0];
      this.cancel(entry);
      entry.onTimer(now);
    }
    if (!this.#closed) this.#arm();
  }

  #up(index: number): void {
    const heap = this.#heap;
    const entry = heap[index];
    while (index > 0) {
      const parentIndex = (index - 1) >> 1;
      const parent = heap[parentIndex];
      if (parent.timerAt <= entry.timerAt) break;
      heap[index] = parent;
      parent.timerIndex = index;
      index = parentIndex;
    }
    heap[index] = entry;
    entry.timerIndex = index;
  }

  #down(index: number): void {
    const heap = this.#heap;
    const length = heap.length;
    const entry = heap[index];
    for (;;) {
      const left = 2 * index + 1;
      if (left >= length) break;
      const right = left + 1;
      const child = right < length && heap[right].timerAt < heap[left].timerAt ? right : left;
      if (heap[child].timerAt >= entry.timerAt) break;
      heap[index] = heap[child];
      heap[index].timerIndex = index;
      index = child;
    }
    heap[index] = entry;
    entry.timerIndex = index;
  }
}
