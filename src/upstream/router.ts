/**
 * The router: hands each question to the upstream set of its zone (`--zone`), like miekg's
 * `ServeMux` or Unbound's `forward-zone`. The longest matching zone wins; a DS question is
 * routed by its name minus the first label, since the parent side of a delegation answers
 * DS (RFC 4034 section 5), as Unbound and dnsproxy do. Names in no zone go to the
 * special-use names when they hold them, else to the default route (`--upstream`). There
 * is no fall-through: a zone whose targets fail answers SERVFAIL (or stale from the cache),
 * and its names never go to another route.
 *
 * @module
 */

import { RRType } from "../dns/wire.ts";
import type { Forwarder, UpstreamRequest } from "./forwarder.ts";
import type { SpecialUseNames } from "./special_use.ts";
import { ZoneTable } from "./zone_table.ts";

/** Where a route's questions go. */
export interface Route {
  /** Its `route` label in metrics: the zone as configured, `default` or `special-use`. */
  readonly label: string;
  /** The upstream set (or local answers) it hands questions to. */
  readonly forwarder: Forwarder;
  /**
   * Answers keep the TTLs their targets gave, not raised to `--cache-min-ttl` (zone targets:
   * a cluster DNS's headless-service addresses change often).
   */
  readonly keepTtls: boolean;
}

/** Statistics hooks of the router. */
export interface RouterStats {
  /** A question went to the route labelled `route`. */
  routed(route: string): void;
}

/** Hooks that record nothing. */
export const NO_ROUTER_STATS: RouterStats = { routed() {} };

/**
 * Forwards each question through the route of its zone.
 *
 * @example
 * ```ts ignore
 * const router = new Router({ label: "default", forwarder: pool, keepTtls: false });
 * router.addZone("cluster.local", { label: "cluster.local", forwarder: clusterPool, keepTtls: true });
 * router.forward(request);
 * ```
 */
export class Router implements Forwarder {
  readonly #default: Route;
  readonly #zones = new ZoneTable<Route>();
  readonly #special: SpecialUseNames | null;
  readonly #specialRoute: Route | null;
  readonly #stats: RouterStats;

  /** A router sending what no zone holds to `fallback`, special-use names to `special`. */
  constructor(
    fallback: Route,
    special: SpecialUseNames | null = null,
    stats: RouterStats = NO_ROUTER_STATS,
  ) {
    this.#default = fallback;
    this.#special = special;
    this.#specialRoute = special === null
      ? null
      : { label: "special-use", forwarder: special, keepTtls: false };
    this.#stats = stats;
  }

  /** Routes `zone` (lowercase, no final dot) to `route`. */
  addZone(zone: string, route: Route): void {
    this.#zones.add(zone, route);
  }

  /**
   * The route of the question in `message` (question ending at `questionEnd`): the longest
   * `--zone` holding its name (its parent's name for DS), whatever the special-use names
   * hold; then the special-use names; then the default route.
   */
  route(message: Uint8Array, questionEnd: number): Route {
    const qtype = (message[questionEnd - 4] << 8) | message[questionEnd - 3];
    const zone = this.#zones.size === 0
      ? null
      : this.#zones.lookup(message, qtype === RRType.DS ? 1 : 0);
    if (zone !== null) return zone;
    if (this.#special !== null && this.#special.holds(message)) return this.#specialRoute!;
    return this.#default;
  }

  /** Hands `request` to its route's forwarder. */
  forward(request: UpstreamRequest): void {
    const route = this.route(request.query, request.questionEnd);
    this.#stats.routed(route.label);
    if (route.keepTtls) request.keepTtls = true;
    route.forwarder.forward(request);
  }

  /** Closes every route's forwarder, each once. */
  async close(): Promise<void> {
    const forwarders = new Set<Forwarder>([this.#default.forwarder]);
    for (const route of this.#zones.values()) forwarders.add(route.forwarder);
    if (this.#special !== null) forwarders.add(this.#special);
    await Promise.all([...forwarders].map((forwarder) => forwarder.close()));
  }
}
