/**
 * Special-use names (`--special-use-names`): names that must never reach a public resolver,
 * answered by dotproxy itself. A public resolver cannot answer them usefully, and asking
 * one tells it what a private network is called and looked up (RFC 6761, RFC 6303).
 *
 * @module
 */

import { buildLocalAnswer, type LocalZoneKind } from "../dns/local_answer.ts";
import { parseCidr, reverseZones } from "../net/ip.ts";
import type { Forwarder, UpstreamRequest } from "./forwarder.ts";
import { UpstreamError } from "./errors.ts";
import { ZoneTable } from "./zone_table.ts";

/**
 * The networks whose reverse zones are answered here: RFC 6303 section 4 (RFC 1918
 * private, "this network", loopback, link-local, the documentation networks, the limited
 * broadcast address; IPv6 unspecified, loopback, unique-local, link-local, documentation),
 * plus the shared address space of carrier-grade NAT (RFC 6598, 100.64.0.0/10).
 */
const NETWORKS = [
  "10.0.0.0/8",
  "172.16.0.0/12",
  "192.168.0.0/16",
  "0.0.0.0/8",
  "127.0.0.0/8",
  "169.254.0.0/16",
  "192.0.2.0/24",
  "198.51.100.0/24",
  "203.0.113.0/24",
  "255.255.255.255/32",
  "100.64.0.0/10",
  "::/128",
  "::1/128",
  "fd00::/8",
  "fe80::/10",
  "2001:db8::/32",
];

/**
 * The domains answered here: `localhost` (RFC 6761 section 6.3), `invalid` (section 6.4),
 * `onion` (RFC 7686), `local` (mDNS, RFC 6762: a unicast resolver must not see it) and
 * `home.arpa` (RFC 8375). Not `test`: labs use it with private upstreams.
 */
const DOMAINS = ["localhost", "invalid", "onion", "local", "home.arpa"];

/**
 * Every special-use zone, lowercase, without the final dot: the domains, then the reverse
 * zones of the networks.
 */
export const SPECIAL_USE_ZONES: readonly string[] = [
  ...DOMAINS,
  ...NETWORKS.flatMap((text) => reverseZones(parseCidr(text))),
];

/**
 * Answers the special-use names. As a {@linkcode Forwarder} it settles each question at
 * once with its local answer (the router sends it only names in its zones).
 *
 * @example
 * ```ts ignore
 * const special = new SpecialUseNames();
 * if (special.holds(query)) special.forward(request);
 * ```
 */
export class SpecialUseNames implements Forwarder {
  readonly #zones = new ZoneTable<LocalZoneKind>();

  /** Creates the table of {@linkcode SPECIAL_USE_ZONES}. */
  constructor() {
    for (const zone of SPECIAL_USE_ZONES) {
      this.#zones.add(zone, zone === "localhost" ? "localhost" : "empty");
    }
  }

  /** True when the question name of `message` is in a special-use zone. */
  holds(message: Uint8Array): boolean {
    return this.#zones.lookup(message, 0) !== null;
  }

  /** Answers `request` from its zone (one outside them all fails: the router sends none). */
  forward(request: UpstreamRequest): void {
    const query = request.query;
    const kind = this.#zones.lookup(query, 0);
    if (kind === null) {
      request.settleFailure(new UpstreamError("unavailable", "not a special-use name"));
      return;
    }
    request.settleAnswer(
      buildLocalAnswer(query, request.questionEnd, this.#zones.apex, kind),
      "special-use",
      null,
    );
  }

  /** Nothing to release. */
  close(): void {}
}
