import assert from "node:assert/strict";
import { ManualClock, type Timed, TimerQueue } from "../src/timers.ts";

function entry(fired: string[], name: string): Timed & { name: string } {
  return { name, timerAt: 0, timerIndex: -1, onTimer: () => fired.push(name) };
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
  const again: Timed = {
    timerAt: 0,
    timerIndex: -1,
    onTimer: (now) => {
      fired.push("again");
      if (fired.filter((f) => f === "again").length < 3) timers.schedule(again, now);
    },
  };
  timers.schedule(again, 30);
  clock.advance(40);
  assert.deepEqual(fired, ["a", "again", "again", "again"]);
  clock.advance(200);
  assert.deepEqual(fired.at(-1), "b");
  timers.close();
  assert.equal(clock.pending, 0);
});
