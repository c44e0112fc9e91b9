/**
 * The HTTP endpoint for operators: `GET /metrics` (Prometheus text format 0.0.4),
 * `GET /healthz` (the process serves) and `GET /readyz` (an upstream answers).
 *
 * @module
 */

import type { ListenAddress } from "../config.ts";
import type { Logger } from "../log.ts";

/** The readiness verdict. */
export interface Readiness {
  /** True when at least one upstream answered recently or answers a probe now. */
  ready: boolean;
  /** Why, in a few words, shown in the response body. */
  reason: string;
}

/** What the endpoint serves. */
export interface HttpHandlers {
  /** The metrics exposition text. */
  metrics(): string;
  /** Decides readiness, possibly probing an upstream. */
  readiness(): Promise<Readiness>;
}

const TEXT = "text/plain; charset=utf-8";
const PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8";

/**
 * Routes one request. Exported for tests; {@linkcode HttpServer} serves it.
 *
 * @example
 * ```ts ignore
 * const response = await route(new Request("http://x/healthz"), handlers);
 * response.status; // 200
 * ```
 */
export async function route(request: Request, handlers: HttpHandlers): Promise<Response> {
  const path = new URL(request.url).pathname;
  const known = path === "/metrics" || path === "/healthz" || path === "/readyz";
  if (!known) {
    return new Response("not found\n", { status: 404, headers: { "content-type": TEXT } });
  }
  if (request.method !== "GET" && request.method !== "HEAD") {
    return new Response("method not allowed\n", {
      status: 405,
      headers: { "content-type": TEXT, allow: "GET, HEAD" },
    });
  }
  if (path === "/healthz") return new Response("ok\n", { headers: { "content-type": TEXT } });
  if (path === "/metrics") {
    return new Response(handlers.metrics(), { headers: { "content-type": PROMETHEUS } });
  }
  const readiness = await handlers.readiness();
  return new Response(`${readiness.ready ? "ready" : "not ready"}: ${readiness.reason}\n`, {
    status: readiness.ready ? 200 : 503,
    headers: { "content-type": TEXT },
  });
}

/**
 * Serves {@linkcode route} with `Deno.serve`.
 *
 * @example
 * ```ts ignore
 * const http = HttpServer.listen({ hostname: "127.0.0.1", port: 5380 }, handlers, log);
 * await http.close();
 * ```
 */
export class HttpServer {
  readonly #server: Deno.HttpServer<Deno.NetAddr>;

  private constructor(server: Deno.HttpServer<Deno.NetAddr>) {
    this.#server = server;
  }

  /** Binds `address` and serves; throws the OS error when it cannot bind. */
  static listen(address: ListenAddress, handlers: HttpHandlers, log: Logger): HttpServer {
    const server = Deno.serve({
      hostname: address.hostname,
      port: address.port,
      onListen: () => {},
      onError: (error) => {
        log.error("http handler failed", { error: String(error) });
        return new Response("internal error\n", { status: 500 });
      },
    }, (request) => route(request, handlers));
    return new HttpServer(server);
  }

  /** The bound address. */
  get addr(): Deno.NetAddr {
    return this.#server.addr;
  }

  /** Stops serving. */
  async close(): Promise<void> {
    await this.#server.shutdown();
  }
}
