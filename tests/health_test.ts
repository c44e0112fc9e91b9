import assert from "node:assert/strict";
import { LatencyTracker } from "../src/upstream/health.ts";

/** The 95th percentile by sorting: what LatencyTracker.p95 must equal. */
function sortedP95(samples: readonly number[]): number {
  const sorted = [...samples].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil(sorted.length * 0.95) - 1)];
}

Deno.test("latency: p95 of the last 128 answer times equals the sorted reference", () => {
  let seed = 12345;
  const next = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  for (let trial = 0; trial < 40; trial++) {
    const latency = new LatencyTracker();
    const seen: number[] = [];
    const count = 1 + Math.floor(next() * 400);
    for (let i = 1; i <= count; i++) {
      // Ties and outliers both: a few whole milliseconds, a long tail.
      const ms = next() < 0.4 ? Math.floor(next() * 4) : next() * next() * 500;
      latency.record(ms);
      seen.push(ms);
      // It recomputes after each of the first 16 samples, then every 16th.
      if (i <= 16 || i % 16 === 0) {
        assert.equal(latency.p95, sortedP95(seen.slice(-128)), `trial ${trial}, sample ${i}`);
      }
    }
  }
});

Deno.test("latency: p95 follows a change of speed within the window", () => {
  const latency = new LatencyTracker();
  for (let i = 0; i < 128; i++) latency.record(1);
  assert.equal(latency.p95, 1);
  for (let i = 0; i < 16; i++) latency.record(80);
  assert.equal(latency.p95, 80, "16 slow answers of the last 128 are more than 5%");
  for (let i = 0; i < 128; i++) latency.record(2);
  assert.equal(latency.p95, 2, "the slow answers left the window");
});
