import assert from "node:assert/strict";
import { type Clock, ManualClock, type Timed, TimerQueue } from "../src/timers.ts";

function entry(fired: string[], name: string): Timed {
  return timed(() => fired.push(name));
}

/**
 * `manual`, with platform timers firing 2 ms late (real ones do): each run of the queue then
 * finds several entries due.
 */
function lateClock(manual: ManualClock): Clock {
  return {
    now: () => manual.now(),
    schedule: (callback, delayMs) => manual.schedule(callback, delayMs + 2),
    cancel: (handle) => manual.cancel(handle),
  };
}

/** An entry that runs `onTimer`. */
function timed(onTimer: (now: number) => void): Timed {
  return { timerAt: 0, timerIndex: -1, timerSlot: -1, onTimer };
}

Deno.test("timers: deadlines fire in time order, each once, on one platform timer", () => {
  const clock = new ManualClock(0);
  const timers = new TimerQueue(clock);
  const fired: string[] = [];
  const order = [50, 10, 40, 20, 30, 10];
  order.forEach((at, i) => timers.schedule(entry(fired, `${at}/${i}`), at));
  assert.equal(timers.size, 6);
  assert.equal(clock.pending, 1, "one platform timer for all deadlines");
  clock.advance(25);
  assert.deepEqual(fired.sort(), ["10/1", "10/5", "20/3"]);
  clock.advance(100);
  assert.equal(fired.length, 6);
  assert.equal(timers.size, 0);
  assert.equal(clock.pending, 0, "nothing armed once empty");
  timers.close();
});

Deno.test("timers: a cancelled entry leaves the heap at once and never fires", () => {
  const clock = new ManualClock(0);
  const timers = new TimerQueue(clock);
  const fired: string[] = [];
  const entries = Array.from({ length: 1000 }, (_, i) => entry(fired, String(i)));
  entries.forEach((e, i) => timers.schedule(e, 1000 + (i * 7919) % 1000));
  // Answered long before their deadlines: completed work is not kept until it expires.
  for (let i = 0; i < 1000; i += 2) timers.cancel(entries[i]);
  assert.equal(timers.size, 500);
  for (const e of entries) {
    if (e.timerIndex >= 0) assert.ok(e.timerIndex < timers.size);
  }
  clock.advance(2000);
  assert.equal(fired.length, 500);
  assert.ok(fired.every((name) => Number(name) % 2 === 1));
  timers.close();
});

Deno.test("timers: rescheduling moves an entry; one scheduled from a callback waits its turn", () => {
  const clock = new ManualClock(0);
  const timers = new TimerQueue(clock);
  const fired: string[] = [];
  const a = entry(fired, "a");
  const b = entry(fired, "b");
  timers.schedule(a, 100);
  timers.schedule(b, 50);
  timers.schedule(a, 20); // earlier
  timers.schedule(b, 200); // later
  const again: Timed = timed((now) => {
    fired.push("again");
    if (fired.filter((f) => f === "again").length < 3) timers.schedule(again, now);
  });
  timers.schedule(again, 30);
  clock.advance(40);
  assert.deepEqual(fired, ["a", "again", "again", "again"]);
  clock.advance(200);
  assert.deepEqual(fired.at(-1), "b");
  timers.close();
  assert.equal(clock.pending, 0);
});

Deno.test("timers: near (wheel) and far (heap) deadlines, cancels and moves agree with a model", () => {
  const manual = new ManualClock(0);
  const timers = new TimerQueue(lateClock(manual));
  let seed = 42;
  const random = () => {
    // mulberry32: a fixed sequence, so a failure replays.
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const fired: { name: number; deadline: number; at: number }[] = [];
  const entries = Array.from({ length: 200 }, (_, name): Timed => {
    const e = timed((now) => fired.push({ name, deadline: e.timerAt, at: now }));
    return e;
  });
  /** Deadline of each queued entry, and when it is due (the deadline, or now if passed). */
  const model = new Map<number, number>();
  const dueBy = new Map<number, number>();
  let runs = 0;
  for (let step = 0; step < 5000; step++) {
    const op = random();
    const name = Math.floor(random() * entries.length);
    if (op < 0.5) {
      const kind = random();
      const delay = kind < 0.6
        ? random() * 60 // hedges and attempt deadlines: the wheel
        : kind < 0.9
        ? 900 + random() * 3000 // around and past the wheel's reach: the heap
        : -random() * 5; // already due
      const deadline = manual.now() + delay;
      timers.schedule(entries[name], deadline);
      model.set(name, deadline);
      dueBy.set(name, Math.max(deadline, manual.now()));
    } else if (op < 0.7) {
      timers.cancel(entries[name]);
      model.delete(name);
    } else {
      const before = fired.length;
      manual.advance(random() * (random() < 0.05 ? 3000 : 40));
      const batch = fired.slice(before);
      for (const { name: firedName, deadline, at } of batch) {
        assert.equal(model.get(firedName), deadline, `entry ${firedName} queued when it fired`);
        assert.ok(at >= deadline, `entry ${firedName} not before its deadline`);
        model.delete(firedName);
      }
      for (let i = 1; i < batch.length; i++) {
        const [a, b] = [batch[i - 1], batch[i]];
        if (a.at === b.at) runs++;
        assert.ok(a.at < b.at || a.deadline <= b.deadline, "each run fires in deadline order");
      }
      for (const name of model.keys()) {
        assert.ok(dueBy.get(name)! > manual.now() - 3, "nothing long due is left");
      }
    }
    assert.equal(timers.size, model.size);
    assert.ok(manual.pending <= 1, "one platform timer");
  }
  assert.ok(runs > 100, "runs with several entries due were exercised");
  manual.advance(10_000);
  assert.equal(timers.size, 0);
  timers.close();
  assert.equal(manual.pending, 0);
});

Deno.test("timers: a callback that cancels or moves another entry due in the same run wins", () => {
  const manual = new ManualClock(0);
  const timers = new TimerQueue(lateClock(manual));
  const fired: string[] = [];
  const cancelled = entry(fired, "cancelled");
  const moved = entry(fired, "moved");
  const first = timed(() => {
    fired.push("first");
    // As a request that fails cancels the stale-answer timers of its waiting clients.
    timers.cancel(cancelled);
    timers.schedule(moved, 30);
  });
  const farCancelled = entry(fired, "far cancelled");
  const farFirst = timed(() => {
    fired.push("far first");
    timers.cancel(farCancelled);
  });
  // Scheduled latest first: the order they fire in is their deadlines'.
  const plan: [Timed, number][] = [
    [moved, 10.7],
    [cancelled, 10.5],
    [first, 10],
    [farCancelled, 5000.5],
    [farFirst, 5000],
  ];
  for (const [e, at] of plan) timers.schedule(e, at);
  manual.advance(20);
  assert.deepEqual(fired, ["first"]);
  manual.advance(20);
  assert.deepEqual(fired, ["first", "moved"]);
  manual.advance(5000);
  assert.deepEqual(fired, ["first", "moved", "far first"]);
  assert.equal(timers.size, 0);
  timers.close();
});
