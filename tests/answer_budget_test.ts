import assert from "node:assert/strict";
import { AnswerBudget } from "../src/server/answer_budget.ts";

/** Fills `share` with queries while the budget admits them; returns how many. */
function fill(budget: AnswerBudget, share: ReturnType<AnswerBudget["share"]>, most = 10_000) {
  let n = 0;
  while (n < most && budget.mayAdmit(share)) {
    budget.started(share);
    n++;
  }
  return n;
}

Deno.test("answer budget: one client alone may use all of it", () => {
  // A 65,535-octet estimate at first: 1 MiB admits 17 (the 17th while 16 fill 1,048,560).
  const budget = new AnswerBudget(1024 * 1024);
  const alone = budget.share("192.0.2.1");
  assert.equal(fill(budget, alone), 17);
  assert.equal(budget.busyClients, 1);
});

Deno.test("answer budget: a second client gets its equal part while the first holds it all", () => {
  const budget = new AnswerBudget(1024 * 1024);
  const hog = budget.share("192.0.2.1");
  assert.equal(fill(budget, hog), 17);
  const victim = budget.share("2001:db8::");
  // Half the budget is its own, although the whole budget is in use.
  assert.equal(fill(budget, victim), 9);
  // The hog is over its part: nothing more for it until it gives back.
  assert.equal(budget.mayAdmit(hog), false);
  for (let i = 0; i < 17; i++) budget.answered(hog, 65535);
  assert.equal(budget.busyClients, 1);
  assert.equal(budget.mayAdmit(hog), true);
});

Deno.test("answer budget: unsent answers count; the connections of one client share one part", () => {
  const budget = new AnswerBudget(1024 * 1024);
  const a = budget.share("192.0.2.1");
  const same = budget.share("192.0.2.1");
  assert.equal(a, same, "one share per client");
  assert.equal(a.connections, 2);
  budget.queued(a, 1024 * 1024);
  assert.equal(budget.mayAdmit(same), false, "its unsent answers fill its part");
  assert.equal(budget.pressed, true, "a whole budget unsent");
  budget.sent(a, 1024 * 1024);
  assert.equal(budget.pressed, false);
  assert.equal(budget.mayAdmit(same), true);
  assert.equal(budget.busyClients, 0);
  budget.release(a);
  budget.release(same);
  assert.notEqual(budget.share("192.0.2.1"), a, "forgotten once its last connection closed");
});

Deno.test("answer budget: never more than twice the budget, however many clients arrive", () => {
  const budget = new AnswerBudget(1024 * 1024);
  let total = 0;
  for (let i = 0; i < 100; i++) total += fill(budget, budget.share(`192.0.2.${i}`));
  assert.ok(total <= 34, `${total} queries of 64 KiB`);
  assert.ok(budget.used <= 2 * 1024 * 1024 + 65535);
});

Deno.test("answer budget: small answers wear the estimate down", () => {
  const budget = new AnswerBudget(1024 * 1024);
  const share = budget.share("192.0.2.1");
  for (let i = 0; i < 1000; i++) {
    budget.started(share);
    budget.answered(share, 100);
  }
  // Now about 512 octets per answer: 2,048 queries fit.
  assert.equal(fill(budget, share), 2048);
});
