/**
 * Waiting in tests: one `sleep`, one polling loop. Tests wait for something to become true
 * (a connection counted, a server up) by polling it, never by sleeping a guessed time; every
 * poll is bounded in time and in rounds.
 *
 * @module
 */

import assert from "node:assert/strict";

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Calls `condition` every `intervalMs` until it holds or `timeoutMs` passes (at most 10,000
 * rounds); returns whether it held last time it was asked.
 */
export async function until(
  condition: () => boolean | Promise<boolean>,
  timeoutMs = 3000,
  intervalMs = 10,
): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  for (let round = 0; round < 10_000; round++) {
    if (await condition()) return true;
    if (performance.now() > deadline) return false;
    await sleep(intervalMs);
  }
  return await condition();
}

/**
 * Like {@linkcode until}, but fails the test with "gave up waiting for `what`" when the
 * condition does not hold in time.
 */
export async function waitFor(
  what: string,
  condition: () => boolean | Promise<boolean>,
  timeoutMs = 5000,
  intervalMs = 20,
): Promise<void> {
  if (!await until(condition, timeoutMs, intervalMs)) assert.fail(`gave up waiting for ${what}`);
}
