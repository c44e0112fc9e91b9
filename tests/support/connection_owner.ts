/**
 * A {@linkcode ConnectionOwner} for tests that drive one {@linkcode StreamConnection} by hand:
 * it records what the connection reports, and gives it a DoT context.
 *
 * @module
 */

import { Logger } from "../../src/log.ts";
import { SYSTEM_CLOCK, TimerQueue } from "../../src/timers.ts";
import type { UpstreamSpec } from "../../src/config.ts";
import type {
  ConnectionContext,
  ConnectionOwner,
  UpstreamConnection,
} from "../../src/upstream/connection.ts";
import { Exchange } from "../../src/upstream/exchange.ts";
import { NudgeBudget } from "../../src/upstream/nudge.ts";
import type { StreamConnection } from "../../src/upstream/stream_connection.ts";
import { tlsDialer } from "../../src/upstream/tls_dial.ts";
import type { UpstreamError } from "../../src/upstream/errors.ts";
import { NO_UPSTREAM_STATS } from "../../src/upstream/stats.ts";
import { CA_PEM } from "../fixtures/certs.ts";
import { buildQuery } from "./dns.ts";

/**
 * Records answers and problems; `nudgeTokens` bounds how many duplicate nudges the
 * connection may send, `nudge` turns nudging off, `outstanding` is the upstream's load.
 */
export class RecordingOwner implements ConnectionOwner {
  /** Close it when done: a cancelled nudge leaves its platform timer armed until it fires. */
  readonly timers = new TimerQueue(SYSTEM_CLOCK);
  /** A DoT context for a connection to `spec`, trusting the test CA. */
  readonly context: ConnectionContext;
  readonly answered: { exchange: Exchange; response: Uint8Array }[] = [];
  readonly problems: string[] = [];
  #opened: () => void = () => {};
  readonly opened = new Promise<void>((resolve) => this.#opened = resolve);
  constructor(
    spec: UpstreamSpec,
    nudgeTokens: number,
    nudge = true,
    /** What the upstream owes over all its connections: above 4, no nudge at read time. */
    outstanding = 1,
  ) {
    this.context = {
      spec,
      dial: tlsDialer(spec, [CA_PEM]),
      connectTimeoutMs: 2000,
      nudging: nudge
        ? { budget: new NudgeBudget(nudgeTokens), outstanding: () => outstanding, padFiller: false }
        : null,
      log: new Logger({ level: "error", sink: () => {} }),
      stats: NO_UPSTREAM_STATS("test"),
      clock: SYSTEM_CLOCK,
      timers: this.timers,
    };
  }
  onOpen(): void {
    this.#opened();
  }
  onAnswer(_c: UpstreamConnection, exchange: Exchange, response: Uint8Array): void {
    this.answered.push({ exchange, response });
  }
  onBadAnswer(_c: UpstreamConnection, _e: Exchange, reason: string): void {
    this.problems.push(`bad answer: ${reason}`);
  }
  onClosed(_c: UpstreamConnection, _o: Exchange[], failure: UpstreamError | null): void {
    if (failure) this.problems.push(`closed: ${failure.message}`);
  }
}

/** The upstream spec of a test DoT server on loopback `port` (TLS name `dns.test`). */
export function loopbackSpec(port: number): UpstreamSpec {
  return { address: "127.0.0.1", port, tlsName: "dns.test", label: `127.0.0.1:${port}#dns.test` };
}

/** Closes `connection` and waits for it, then its owner's timer queue, then `server`. */
export async function closeAll(
  connection: StreamConnection,
  owner: RecordingOwner,
  server: { close(): Promise<void> },
): Promise<void> {
  connection.close();
  await connection.finished;
  owner.timers.close();
  await server.close();
}

/** An exchange asking `name` (A, IN), not tied to any request. */
export function exchangeFor(name: string): Exchange {
  const message = buildQuery(name, { id: 0 });
  // Header, the name (one length octet per label, and the root), type and class.
  const questionEnd = 12 + name.length + 2 + 4;
  return new Exchange(message, questionEnd, null, "query");
}
