/**
 * Helpers to run the proxy in-process on ephemeral loopback ports and to talk to it over
 * real UDP and TCP sockets.
 *
 * @module
 */

import { type RunningProxy, type StartOptions, startProxy } from "../../src/app.ts";
import {
  type Config,
  ConfigError,
  defaultConfig,
  parseConfig,
  parseUpstream,
  type ZoneRoute,
} from "../../src/config.ts";
import { Logger, type LogLevel } from "../../src/log.ts";
import { CA_PEM } from "../fixtures/certs.ts";
import { lengthFramed } from "./dns.ts";

/** Log lines captured from a proxy under test. */
export class LogCapture {
  readonly lines: string[] = [];
  /** A JSON logger writing into `lines`. */
  logger(level: LogLevel = "debug"): Logger {
    return new Logger({ level, format: "json", sink: (line) => this.lines.push(line) });
  }
  /** Parsed records whose `msg` contains `text`. */
  find(text: string): Record<string, unknown>[] {
    return this.lines.map((l) => JSON.parse(l)).filter((r) => String(r.msg).includes(text));
  }
}

/** A configuration for tests: loopback, ephemeral port, the test CA trusted. */
export function testConfig(upstreams: string[], overrides: Partial<Config> = {}): Config {
  return {
    ...defaultConfig(),
    listen: [{ hostname: "127.0.0.1", port: 0 }],
    upstreams: upstreams.map((u) => parseUpstream(u, "--upstream")),
    timeoutMs: 2000,
    logLevel: "debug",
    logFormat: "json",
    caCerts: [CA_PEM],
    maxTcpConnections: 100,
    tcpIdleTimeoutMs: 2000,
    ...overrides,
  };
}

/** The routes of `--zone` values, parsed as the command line parses them. */
export function zones(...entries: string[]): ZoneRoute[] {
  const request = parseConfig(entries.flatMap((entry) => ["--zone", entry]), () => undefined);
  if (request.kind !== "config") throw new ConfigError("not a configuration");
  return request.config.zones;
}

/** A proxy started for one test, with its captured logs. */
export interface TestProxy {
  proxy: RunningProxy;
  logs: LogCapture;
  /** UDP and TCP port of the first listener. */
  port: number;
}

/** Starts a proxy for `config`, runs `fn`, and closes the proxy however `fn` ends. */
export async function withProxy(
  config: Config,
  fn: (p: TestProxy) => Promise<void>,
  options: StartOptions = {},
): Promise<void> {
  const logs = new LogCapture();
  const proxy = await startProxy(config, logs.logger(config.logLevel), options);
  try {
    await fn({ proxy, logs, port: proxy.udp[0].addr.port });
  } finally {
    await proxy.close();
  }
}

/** Sends one UDP datagram and waits for the reply; null when none comes within `timeoutMs`. */
export async function udpExchange(
  port: number,
  query: Uint8Array,
  timeoutMs = 3000,
  hostname = "127.0.0.1",
): Promise<Uint8Array | null> {
  const socket = Deno.listenDatagram({ transport: "udp", hostname, port: 0 });
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await socket.send(query, { transport: "udp", hostname, port });
    const timeout = new Promise<null>((resolve) => {
      timer = setTimeout(() => resolve(null), timeoutMs);
    });
    const received = await Promise.race([socket.receive(), timeout]);
    return received === null ? null : received[0];
  } finally {
    clearTimeout(timer);
    socket.close();
  }
}

/** A DNS-over-TCP client for tests; over TLS (DoT) with {@linkcode TcpDnsClient.connectTls}. */
export class TcpDnsClient {
  readonly conn: Deno.Conn;
  #buffer = new Uint8Array(0);
  #closed = false;

  private constructor(conn: Deno.Conn) {
    this.conn = conn;
  }

  /** Connects to the proxy. */
  static async connect(port: number, hostname = "127.0.0.1"): Promise<TcpDnsClient> {
    return new TcpDnsClient(await Deno.connect({ hostname, port, transport: "tcp" }));
  }

  /**
   * Connects over TLS, trusting the test CA, and completes the handshake (rejects when it
   * fails). `alpn` is what the client offers (none by default, as dnsperf and kdig).
   */
  static async connectTls(
    port: number,
    hostname = "127.0.0.1",
    alpn?: string[],
  ): Promise<TcpDnsClient> {
    const conn = await Deno.connectTls({
      hostname,
      port,
      caCerts: [CA_PEM],
      ...(alpn ? { alpnProtocols: alpn } : {}),
    });
    try {
      await conn.handshake();
    } catch (error) {
      conn.close();
      throw error;
    }
    return new TcpDnsClient(conn);
  }

  /** Writes raw bytes. */
  async writeRaw(bytes: Uint8Array): Promise<void> {
    for (let off = 0; off < bytes.length;) off += await this.conn.write(bytes.subarray(off));
  }

  /** Writes one length-prefixed message. */
  async send(message: Uint8Array): Promise<void> {
    await this.writeRaw(lengthFramed(message));
  }

  /**
   * Reads one length-prefixed message; null at EOF. Rejects when nothing arrives within
   * `timeoutMs` (the connection is closed then).
   */
  async receive(timeoutMs = 3000): Promise<Uint8Array | null> {
    const timer = setTimeout(() => this.close(), timeoutMs);
    try {
      for (;;) {
        if (this.#buffer.length >= 2) {
          const length = (this.#buffer[0] << 8) | this.#buffer[1];
          if (this.#buffer.length >= 2 + length) {
            const message = this.#buffer.slice(2, 2 + length);
            this.#buffer = this.#buffer.slice(2 + length);
            return message;
          }
        }
        const chunk = new Uint8Array(65536);
        let n: number | null;
        try {
          n = await this.conn.read(chunk);
        } catch (error) {
          if (this.#closed) throw new Error(`no message within ${timeoutMs} ms`);
          throw error;
        }
        if (n === null) return null;
        const joined = new Uint8Array(this.#buffer.length + n);
        joined.set(this.#buffer);
        joined.set(chunk.subarray(0, n), this.#buffer.length);
        this.#buffer = joined;
      }
    } finally {
      clearTimeout(timer);
    }
  }

  /** Waits until the server closes the connection; true if it did within `timeoutMs`. */
  async closedByPeer(timeoutMs: number): Promise<boolean> {
    const timer = setTimeout(() => this.close(), timeoutMs);
    try {
      const chunk = new Uint8Array(65536);
      for (;;) {
        const n = await this.conn.read(chunk);
        if (n === null) return true;
      }
    } catch {
      return !this.#closed;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Closes the connection. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.conn.close();
    } catch {
      // already closed
    }
  }
}

/** A `main.ts` subprocess with a kill timer. */
export interface MainProcess {
  /** The process; stdout and stderr are piped. */
  child: Deno.ChildProcess;
  /** True once the kill timer fired. */
  timedOut(): boolean;
  /** Cancels the kill timer (call when done). */
  stopTimer(): void;
}

const ROOT = new URL("../../", import.meta.url);

/**
 * Runs `deno run --allow-net --allow-env main.ts ...args` with the parent's environment minus
 * every `DOTPROXY_*` variable, plus `env`; kills it with SIGKILL after `limitMs`.
 */
export function spawnMain(
  args: string[],
  env: Record<string, string> = {},
  limitMs = 20_000,
): MainProcess {
  const inherited = Object.fromEntries(
    Object.entries(Deno.env.toObject()).filter(([name]) => !name.startsWith("DOTPROXY_")),
  );
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-net", "--allow-env", "main.ts", ...args],
    cwd: ROOT,
    clearEnv: true,
    env: { ...inherited, NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let killed = false;
  const timer = setTimeout(() => {
    killed = true;
    try {
      child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }, limitMs);
  return { child, timedOut: () => killed, stopTimer: () => clearTimeout(timer) };
}
