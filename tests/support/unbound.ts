/**
 * A real Unbound serving DNS over TLS on loopback with the test certificate and a local
 * zone, which a test can freeze (SIGSTOP), resume (SIGCONT), kill and start again on the
 * same port: the real-process counterpart of `FaultyUpstream`'s "freeze" and "refuse".
 *
 * Needs `--allow-run` (unbound), `--allow-write` and `--allow-read` on the temporary
 * directory (its configuration and key), `--allow-net` for the readiness check.
 *
 * @module
 */

import { SERVER_KEY, SERVER_PEM } from "../fixtures/certs.ts";
import { freeStablePort } from "./fault_upstream.ts";
import { sleep } from "./wait.ts";

/** Options of {@linkcode UnboundUpstream.start}. */
export interface UnboundOptions {
  /** Port for DoT (default: a free port below the ephemeral range, see `freeStablePort`). */
  port?: number;
  /** The static local zone it serves (default "unbound.test."). */
  zone?: string;
  /**
   * `local-data` records, one string each in zone-file syntax (default
   * `www.<zone> 300 IN A 192.0.2.10`). Names outside the zone are refused by Unbound.
   */
  localData?: string[];
  /** Extra lines for the `server:` clause, indented by two spaces. */
  extraServerConfig?: string[];
  /** Certificate chain (PEM); default the test certificate for `dns.test`. */
  cert?: string;
  /** Its private key. */
  key?: string;
  /** How long `start` and `restart` wait for the port to accept TCP (default 5000 ms). */
  readyTimeoutMs?: number;
  /**
   * Serve plain DNS (UDP and TCP) on the port instead of DoT: a stand-in for a cluster DNS
   * or any other plain-DNS zone target.
   */
  plain?: boolean;
  /** More static local zones, beside `zone` (their records go in `localData`). */
  moreZones?: string[];
}

/** Where the process is: running, stopped by SIGSTOP, or not running at all. */
export type UnboundState = "running" | "stopped" | "dead";

const STDERR_KEEP = 8192;

/**
 * The `server:` lines every test Unbound shares: DoT on `port` with the test certificate in
 * `dir`, in the foreground, one thread, iterator only (no validator).
 */
export function unboundServerHead(port: number, dir: string): string[] {
  return [
    "server:",
    `  interface: 127.0.0.1@${port}`,
    `  tls-port: ${port}`,
    `  tls-service-key: "${dir}/server.key"`,
    `  tls-service-pem: "${dir}/server.pem"`,
    `  username: ""`,
    `  chroot: ""`,
    `  directory: "${dir}"`,
    `  pidfile: "${dir}/unbound.pid"`,
    "  do-daemonize: no",
    "  use-syslog: no",
    "  verbosity: 1",
    "  num-threads: 1",
    "  so-reuseport: no",
    `  module-config: "iterator"`,
  ];
}

/** The `server:` lines of a plain-DNS Unbound: UDP and TCP on `port`, otherwise the same. */
function plainServerHead(port: number, dir: string): string[] {
  return unboundServerHead(port, dir).filter((line) => !line.trimStart().startsWith("tls-"));
}

/**
 * Writes the configuration (`unbound.conf`), certificate and key of an Unbound on `port` into
 * a new temporary directory and returns it: what {@linkcode UnboundUpstream.start} runs, for
 * a test that runs `unbound -d -c DIR/unbound.conf` elsewhere (in a network namespace).
 */
export async function writeUnboundDir(port: number, options: UnboundOptions): Promise<string> {
  const zone = (options.zone ?? "unbound.test").replace(/\.?$/, ".");
  const data = options.localData ?? [`www.${zone} 300 IN A 192.0.2.10`];
  const dir = await Deno.makeTempDir({ prefix: "dotproxy-unbound-" });
  try {
    await Deno.writeTextFile(`${dir}/server.pem`, options.cert ?? SERVER_PEM);
    await Deno.writeTextFile(`${dir}/server.key`, options.key ?? SERVER_KEY);
    await Deno.writeTextFile(
      `${dir}/unbound.conf`,
      [
        ...(options.plain ? plainServerHead(port, dir) : unboundServerHead(port, dir)),
        "  incoming-num-tcp: 64",
        `  local-zone: "${zone}" static`,
        ...(options.moreZones ?? []).map((more) => `  local-zone: "${more}" static`),
        ...data.map((record) => `  local-data: '${record}'`),
        ...(options.extraServerConfig ?? []),
        "remote-control:",
        "  control-enable: no",
        "",
      ].join("\n"),
    );
  } catch (error) {
    await Deno.remove(dir, { recursive: true });
    throw error;
  }
  return dir;
}

/**
 * One `unbound -d` process serving DoT on 127.0.0.1 at a fixed port. Close it at the end of
 * the test (it kills the process and removes its directory).
 *
 * @example
 * ```ts
 * if (await UnboundUpstream.available()) {
 *   const unbound = await UnboundUpstream.start();
 *   try {
 *     unbound.stop(); // frozen: TCP connects complete in the kernel, TLS does not
 *     unbound.resume();
 *     await unbound.kill(); // the port refuses connections
 *     await unbound.restart(); // back on the same port
 *   } finally {
 *     await unbound.close();
 *   }
 * }
 * ```
 */
export class UnboundUpstream {
  /** The address it listens on. */
  readonly hostname = "127.0.0.1";
  /** The DoT port (the same after `restart`). */
  readonly port: number;
  /** The zone it serves, with its final dot. */
  readonly zone: string;
  readonly #dir: string;
  readonly #readyTimeoutMs: number;
  #child: Deno.ChildProcess | null = null;
  #stderrDone: Promise<void> = Promise.resolve();
  #stderr = "";
  #state: UnboundState = "dead";

  private constructor(dir: string, port: number, zone: string, readyTimeoutMs: number) {
    this.#dir = dir;
    this.port = port;
    this.zone = zone;
    this.#readyTimeoutMs = readyTimeoutMs;
  }

  /** True when `unbound -V` runs here (false without the binary or without `--allow-run`). */
  static async available(): Promise<boolean> {
    try {
      const output = await new Deno.Command("unbound", {
        args: ["-V"],
        stdout: "null",
        stderr: "null",
      }).output();
      return output.success;
    } catch {
      return false;
    }
  }

  /** Writes the configuration, starts Unbound and waits until its port accepts TCP. */
  static async start(options: UnboundOptions = {}): Promise<UnboundUpstream> {
    const zone = (options.zone ?? "unbound.test").replace(/\.?$/, ".");
    const port = options.port ?? freeStablePort();
    const dir = await writeUnboundDir(port, options);
    const unbound = new UnboundUpstream(dir, port, zone, options.readyTimeoutMs ?? 5000);
    try {
      await unbound.restart();
    } catch (error) {
      await unbound.close();
      throw error;
    }
    return unbound;
  }

  /** Running, stopped (SIGSTOP) or dead. */
  get state(): UnboundState {
    return this.#state;
  }

  /** Process ID while it runs or is stopped. */
  get pid(): number | undefined {
    return this.#child?.pid;
  }

  /** The last few kilobytes Unbound wrote to stderr. */
  get stderr(): string {
    return this.#stderr;
  }

  /** `--upstream` text for it, verified against `tlsName`. */
  upstream(tlsName = "dns.test"): string {
    return `${this.hostname}:${this.port}#${tlsName}`;
  }

  /**
   * SIGSTOP: the kernel keeps completing TCP handshakes into the backlog, but no TLS
   * handshake, query or answer moves until {@linkcode UnboundUpstream.resume}.
   */
  stop(): void {
    if (this.#state !== "running" || !this.#child) throw new Error(`unbound is ${this.#state}`);
    this.#child.kill("SIGSTOP");
    this.#state = "stopped";
  }

  /** SIGCONT: everything held moves again. */
  resume(): void {
    if (this.#state !== "stopped" || !this.#child) throw new Error(`unbound is ${this.#state}`);
    this.#child.kill("SIGCONT");
    this.#state = "running";
  }

  /** SIGKILL and wait for the exit: the port then refuses connections. */
  async kill(): Promise<void> {
    const child = this.#child;
    if (!child) return;
    try {
      child.kill("SIGKILL");
    } catch {
      // Already exited.
    }
    await child.status;
    await this.#stderrDone;
    this.#child = null;
    this.#state = "dead";
  }

  /**
   * Kills the process if it runs, starts it again on the same port and waits (bounded by
   * `readyTimeoutMs`) until the port accepts TCP.
   */
  async restart(): Promise<void> {
    await this.kill();
    this.#stderr = "";
    const child = new Deno.Command("unbound", {
      args: ["-d", "-c", `${this.#dir}/unbound.conf`],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    this.#state = "running";
    this.#stderrDone = this.#collect(child.stderr);
    const deadline = performance.now() + this.#readyTimeoutMs;
    for (let attempt = 0; attempt < 1000 && performance.now() < deadline; attempt++) {
      try {
        const conn = await Deno.connect({ hostname: this.hostname, port: this.port });
        conn.close();
        return;
      } catch {
        await sleep(25);
      }
    }
    await this.kill();
    throw new Error(
      `unbound did not listen on ${this.port} within ${this.#readyTimeoutMs} ms: ${this.#stderr}`,
    );
  }

  /** Kills the process and removes its directory. */
  async close(): Promise<void> {
    await this.kill();
    await Deno.remove(this.#dir, { recursive: true }).catch(() => {});
  }

  async #collect(stream: ReadableStream<Uint8Array>): Promise<void> {
    const decoder = new TextDecoder();
    try {
      for await (const chunk of stream) {
        this.#stderr = (this.#stderr + decoder.decode(chunk, { stream: true }))
          .slice(-STDERR_KEEP);
      }
    } catch {
      // The pipe broke with the process.
    }
  }
}
