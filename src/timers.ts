/**
 * Time for the whole proxy: a {@linkcode Clock} (real, or manual in tests) and a
 * {@linkcode TimerQueue}, deadlines in a timer wheel driven by one platform timer.
 *
 * Every client job and upstream request has its own deadline, and most of them are cancelled
 * long before they fire (the answer came first). A platform timer per deadline would cost an
 * op and a closure per query; a FIFO swept on an interval assumes one timeout for everything
 * and keeps finished entries until they reach its head; a binary heap removes an entry in
 * O(log n), which measured 1.5 us per query at saturation (V8 sampling profile). The wheel
 * adds and removes in O(1), the moment an entry is scheduled or cancelled, so memory follows
 * what is pending, not what passed.
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
  /** Position in the queue, -1 when not queued; written by the queue. */
  timerIndex: number;
  /** Which list of the queue holds it; written by the queue. */
  timerSlot: number;
  /** Called once when due (after removal from the queue). */
  onTimer(now: number): void;
}

/** Milliseconds the wheel reaches ahead; later deadlines wait in a heap. */
const WHEEL_SLOTS = 1024;
const SLOT_MASK = WHEEL_SLOTS - 1;
/** `timerSlot` of an entry in the heap of far deadlines. */
const IN_HEAP = -1;
/** `timerIndex` of an entry taken out to fire in the current run (a cancel still stops it). */
const FIRING = -2;

/**
 * Deadlines fired by one platform timer armed for the earliest. Deadlines within about a
 * second sit in a wheel of one-millisecond slots (the hedge, attempt and stale-answer
 * timers: O(1) to add and to cancel); later ones in a binary min-heap. Due entries fire in
 * time order.
 *
 * @example
 * ```ts
 * import { ManualClock, type Timed, TimerQueue } from "./timers.ts";
 * const clock = new ManualClock();
 * const timers = new TimerQueue(clock);
 * const job: Timed = { timerAt: 0, timerIndex: -1, timerSlot: -1, onTimer: () => {} };
 * timers.schedule(job, clock.now() + 50);
 * timers.cancel(job); // answered in time
 * timers.close();
 * ```
 */
export class TimerQueue {
  /** The clock the deadlines are read from. */
  readonly clock: Clock;
  /** Slot `t & SLOT_MASK` holds the entries due within millisecond `t`, for `t` from `#cursor`. */
  readonly #slots: Timed[][] = Array.from({ length: WHEEL_SLOTS }, () => []);
  #cursor: number;
  #inWheel = 0;
  readonly #heap: Timed[] = [];
  /** Entries taken out by the current run, fired after (reused). */
  readonly #due: Timed[] = [];
  #armedAt = Infinity;
  #handle: TimerHandle | null = null;
  #closed = false;
  readonly #fire = () => this.#run();

  /** Creates an empty queue on `clock`. */
  constructor(clock: Clock = SYSTEM_CLOCK) {
    this.clock = clock;
    this.#cursor = Math.floor(clock.now());
  }

  /** Entries waiting. */
  get size(): number {
    return this.#inWheel + this.#heap.length;
  }

  /** Queues `entry` at time `at`, moving it if it was queued already. */
  schedule(entry: Timed, at: number): void {
    if (this.#closed) return;
    this.#remove(entry);
    entry.timerAt = at;
    if (this.#inWheel === 0) this.#cursor = Math.floor(this.clock.now());
    // Already due: the current slot (its run fires what is due by then).
    const tick = Math.max(Math.floor(at), this.#cursor);
    if (tick - this.#cursor < WHEEL_SLOTS) {
      const slot = this.#slots[tick & SLOT_MASK];
      entry.timerSlot = tick & SLOT_MASK;
      entry.timerIndex = slot.length;
      slot.push(entry);
      this.#inWheel++;
    } else {
      entry.timerSlot = IN_HEAP;
      entry.timerIndex = this.#heap.length;
      this.#heap.push(entry);
      this.#up(entry.timerIndex);
    }
    // Under load new deadlines are later than the ones queued: re-arming is rare.
    if (at < this.#armedAt) this.#armFor(at);
  }

  /** Removes `entry` if queued. */
  cancel(entry: Timed): void {
    this.#remove(entry);
    // The platform timer stays armed; when it fires early it re-arms for the new earliest.
  }

  /** Drops every entry and the platform timer. */
  close(): void {
    this.#closed = true;
    for (const slot of this.#slots) {
      for (const entry of slot) entry.timerIndex = -1;
      slot.length = 0;
    }
    for (const entry of this.#heap) entry.timerIndex = -1;
    for (const entry of this.#due) entry.timerIndex = -1;
    this.#inWheel = 0;
    this.#heap.length = 0;
    this.#disarm();
  }

  #remove(entry: Timed): void {
    const index = entry.timerIndex;
    if (index < 0) {
      // Not queued, or taken out to fire in this run: then it must not fire.
      entry.timerIndex = -1;
      return;
    }
    entry.timerIndex = -1;
    if (entry.timerSlot !== IN_HEAP) {
      const slot = this.#slots[entry.timerSlot];
      const last = slot.pop()!;
      if (last !== entry) {
        slot[index] = last;
        last.timerIndex = index;
      }
      this.#inWheel--;
      return;
    }
    const heap = this.#heap;
    const last = heap.pop()!;
    if (index < heap.length) {
      heap[index] = last;
      last.timerIndex = index;
      this.#up(index);
      this.#down(last.timerIndex);
    }
  }

  #armFor(at: number): void {
    this.#disarm();
    this.#armedAt = at;
    this.#handle = this.clock.schedule(this.#fire, Math.max(0, at - this.clock.now()));
  }

  /** Arms the platform timer for the earliest entry, or for nothing. */
  #arm(): void {
    let earliest = this.#heap.length > 0 ? this.#heap[0].timerAt : Infinity;
    if (this.#inWheel > 0) {
      for (let tick = this.#cursor; tick < this.#cursor + WHEEL_SLOTS; tick++) {
        const slot = this.#slots[tick & SLOT_MASK];
        if (slot.length === 0) continue;
        for (const entry of slot) if (entry.timerAt < earliest) earliest = entry.timerAt;
        break;
      }
    }
    if (earliest === Infinity) this.#disarm();
    else if (earliest < this.#armedAt) this.#armFor(earliest);
  }

  #disarm(): void {
    if (this.#handle !== null) this.clock.cancel(this.#handle);
    this.#handle = null;
    this.#armedAt = Infinity;
  }

  #run(): void {
    this.#handle = null;
    this.#armedAt = Infinity;
    const now = this.clock.now();
    const due = this.#due;
    const nowTick = Math.floor(now);
    if (this.#inWheel > 0) {
      // Every slot before the current millisecond is wholly due; at most a turn of the wheel.
      const last = Math.min(nowTick, this.#cursor + WHEEL_SLOTS - 1);
      for (let tick = this.#cursor; tick <= last && this.#inWheel > 0; tick++) {
        const slot = this.#slots[tick & SLOT_MASK];
        for (let i = slot.length - 1; i >= 0; i--) {
          const entry = slot[i];
          if (entry.timerAt > now) continue;
          this.#remove(entry);
          entry.timerIndex = FIRING;
          due.push(entry);
        }
      }
    }
    if (this.#inWheel === 0 || nowTick > this.#cursor) {
      this.#cursor = Math.max(this.#cursor, Math.min(nowTick, this.#cursor + WHEEL_SLOTS));
    }
    const heap = this.#heap;
    while (heap.length > 0 && heap[0].timerAt <= now) {
      const entry = heap[0];
      this.#remove(entry);
      entry.timerIndex = FIRING;
      due.push(entry);
    }
    if (due.length > 1) due.sort(byTime);
    // Entries scheduled from a callback, even for "now", wait for the next run: no loop.
    for (let i = 0; i < due.length; i++) {
      const entry = due[i];
      // A callback before it may have cancelled or moved it.
      if (entry.timerIndex !== FIRING) continue;
      entry.timerIndex = -1;
      entry.onTimer(now);
    }
    due.length = 0;
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

function byTime(a: Timed, b: Timed): number {
  return a.timerAt - b.timerAt;
}
