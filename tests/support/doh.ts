/**
 * Helpers for the DoH tests: a proxy with a TLS and a plain DoH listener in front of a test
 * upstream, external clients run as subprocesses (skipped with a visible reason when a tool
 * is missing), and DoH URLs.
 *
 * @module
 */

import type { Config } from "../../src/config.ts";
import { SERVER_KEY, SERVER_PEM } from "../fixtures/certs.ts";
import { DotServer, type DotServerOptions } from "./dot_server.ts";
import { testConfig, type TestProxy, withProxy } from "./proxy.ts";

/** True when `command args` runs and exits 0. */
export async function hasTool(command: string, args: string[] = ["--version"]): Promise<boolean> {
  try {
    const out = await new Deno.Command(command, { args, stdout: "null", stderr: "null" })
      .output();
    return out.success;
  } catch {
    return false;
  }
}

/** A test name that says why it is skipped when `available` is false. */
export function named(name: string, available: boolean, tool: string): string {
  return available ? name : `${name} (skipped: ${tool} is not installed)`;
}

/** Runs a command; stdout as bytes, stderr as text. */
export async function run(
  command: string,
  args: string[],
  stdin?: Uint8Array,
): Promise<{ code: number; stdout: Uint8Array; stderr: string }> {
  const child = new Deno.Command(command, {
    args,
    stdin: stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin) {
    const writer = child.stdin.getWriter();
    await writer.write(stdin);
    await writer.close();
  }
  const out = await child.output();
  return { code: out.code, stdout: out.stdout, stderr: new TextDecoder().decode(out.stderr) };
}

/** A running DoH test setup. */
export interface DohSetup extends TestProxy {
  upstream: DotServer;
  /** Port of the TLS DoH listener (first of `proxy.doh`). */
  tlsPort: number;
  /** Port of the plain DoH listener. */
  plainPort: number;
}

/** Starts a test upstream and a proxy with `--listen-doh` and `--listen-doh-plain` on 127.0.0.1. */
export async function withDoh(
  fn: (setup: DohSetup) => Promise<void>,
  overrides: Partial<Config> = {},
  upstreamOptions: DotServerOptions = {},
): Promise<void> {
  const upstream = DotServer.start(upstreamOptions);
  try {
    const config = testConfig([upstream.upstream()], {
      listenDoh: [{ hostname: "127.0.0.1", port: 0 }],
      listenDohPlain: [{ hostname: "127.0.0.1", port: 0 }],
      tlsCert: SERVER_PEM,
      tlsKey: SERVER_KEY,
      ...overrides,
    });
    await withProxy(config, async (test) => {
      const tls = test.proxy.doh.find((listener) => listener.tls);
      const plain = test.proxy.doh.find((listener) => !listener.tls);
      await fn({
        ...test,
        upstream,
        tlsPort: tls?.addr.port ?? 0,
        plainPort: plain?.addr.port ?? 0,
      });
    });
  } finally {
    await upstream.close();
  }
}

/** base64url without padding (RFC 8484 section 4.1). */
export function base64Url(bytes: Uint8Array): string {
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_")
    .replace(/=+$/, "");
}
