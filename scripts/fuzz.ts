/**
 * `deno task fuzz`: the fuzzing of `tests/fuzz_test.ts`, for as long as asked. Hostile
 * client queries and upstream answers go through every wire-format function the proxy
 * applies (checking what must hold of the results), and every so often a batch goes through
 * a running proxy's UDP and TCP listeners with a real DoT upstream.
 *
 *   deno task fuzz                        # a million messages
 *   deno task fuzz --count 5000000
 *   deno task fuzz --seconds 600          # ten minutes, whatever the count
 *   FUZZ_SEED=1234 deno task fuzz         # replay a run (also --seed 1234)
 *
 * Exits 1 at the first failure, printing the seed and the message in hex.
 *
 * @module
 */

import { checkParsers, type ParserTally, randomSeed, Rng } from "../tests/support/fuzz.ts";
import { fuzzListeners } from "../tests/support/fuzz_listeners.ts";

interface Options {
  count: number;
  seconds: number;
  seed: number;
  /** Parser messages between two listener batches. */
  listenerEvery: number;
}

const USAGE = `usage: deno task fuzz [--count N] [--seconds S] [--seed N] [--listener-every N]

  --count N           messages to check (default 1,000,000; with --seconds alone: no limit)
  --seconds S         stop after S seconds, whatever the count
  --seed N            replay a run (a 32-bit unsigned integer; also FUZZ_SEED=N)
  --listener-every N  messages between two batches through a running proxy's UDP and TCP
                      listeners (default 100,000; at least 1,000)
  -h, --help          this text`;

function usage(message: string): never {
  console.error(`fuzz: ${message}`);
  console.error(USAGE);
  Deno.exit(2);
}

function parseArgs(args: string[]): Options {
  const envSeed = Deno.env.get("FUZZ_SEED");
  const options: Options = {
    count: 1_000_000,
    seconds: Infinity,
    seed: envSeed !== undefined && envSeed !== "" ? Number(envSeed) : randomSeed(),
    listenerEvery: 100_000,
  };
  if (args.includes("--help") || args.includes("-h")) {
    console.log(USAGE);
    Deno.exit(0);
  }
  for (let i = 0; i < args.length; i++) {
    const [flag, inline] = args[i].split("=", 2);
    const value = inline ?? args[++i];
    const number = Number(value);
    if (value === undefined || !Number.isFinite(number) || number < 0) {
      usage(`${flag} needs a number, got ${JSON.stringify(value)}`);
    }
    if (flag === "--count") options.count = number;
    else if (flag === "--seconds") {
      options.seconds = number;
      // --seconds alone runs for that long, whatever the count.
      if (!args.some((arg) => arg === "--count" || arg.startsWith("--count="))) {
        options.count = Infinity;
      }
    } else if (flag === "--seed") options.seed = number;
    else if (flag === "--listener-every") options.listenerEvery = Math.max(1000, number);
    else usage(`unknown flag ${flag}`);
  }
  if (!Number.isInteger(options.seed) || options.seed < 0 || options.seed > 0xffffffff) {
    usage(`the seed must be a 32-bit unsigned integer, got ${options.seed}`);
  }
  return options;
}

async function main(): Promise<number> {
  const options = parseArgs(Deno.args);
  console.log(`fuzz: FUZZ_SEED=${options.seed} (replay with FUZZ_SEED=${options.seed})`);
  const rng = new Rng(options.seed);
  const listenerRng = new Rng(options.seed ^ 0x5bd1e995);
  const started = performance.now();
  const deadline = started + options.seconds * 1000;
  const tally: ParserTally = { messages: 0, verdicts: {}, validResponses: 0 };
  let listenerBatches = 0;
  let lastReport = started;
  const step = 5000;
  try {
    while (tally.messages < options.count && performance.now() < deadline) {
      const n = Math.min(step, options.count - tally.messages);
      checkParsers(rng, n, tally);
      if (Math.floor(tally.messages / options.listenerEvery) > listenerBatches) {
        const result = await fuzzListeners(listenerRng, {
          batches: 2,
          udpPerBatch: 200,
          tcpPerBatch: 80,
        });
        listenerBatches++;
        console.log(
          `fuzz: listeners: ${result.udp} udp, ${result.tcp} tcp, ` +
            `${result.fuzzedAnswers} fuzzed answers; all answered after each batch`,
        );
      }
      const now = performance.now();
      if (now - lastReport > 5000) {
        lastReport = now;
        const rate = Math.round(tally.messages / ((now - started) / 1000));
        console.log(
          `fuzz: ${tally.messages} messages (${rate}/s) ${JSON.stringify(tally.verdicts)}`,
        );
      }
    }
  } catch (error) {
    console.error(`fuzz: FAILED after ${tally.messages} messages with FUZZ_SEED=${options.seed}`);
    console.error(error instanceof Error ? (error.stack ?? error.message) : String(error));
    return 1;
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  console.log(
    `fuzz: ok: ${tally.messages} messages (${tally.validResponses} valid answers), ` +
      `${listenerBatches} listener rounds in ${seconds} s; verdicts ${
        JSON.stringify(tally.verdicts)
      }`,
  );
  return 0;
}

Deno.exit(await main());
