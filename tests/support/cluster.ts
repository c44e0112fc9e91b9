/**
 * A fake Kubernetes cluster's DNS for the zone tests: a plain-DNS Unbound serving
 * `cluster.local` (a service's A record, an SRV record, a TXT too big for UDP, the service
 * CIDR's PTR records), and the public DoT Unbound that logs every query and holds a sentinel
 * answer for the same service, so that a leak shows both in its log and in an answer.
 *
 * @module
 */

import type { UnboundOptions } from "./unbound.ts";

/** The service's name, in namespace `shop`. */
export const SERVICE = "orders.shop.svc.cluster.local.";
/** Its ClusterIP, in the service CIDR 10.96.0.0/12. */
export const SERVICE_IP = "10.96.0.20";
/** The address the DoT upstream gives the same name: seeing it means the name leaked. */
export const SENTINEL_IP = "203.0.113.66";
/** The service CIDR. */
export const SERVICE_CIDR = "10.96.0.0/12";
/** A public name the DoT upstream answers, with 192.0.2.10. */
export const PUBLIC_NAME = "www.unbound.test.";

/** 12 strings of 250 octets: 3012 octets of TXT data, too big for any UDP answer here. */
export const BIG_TXT_STRINGS: readonly string[] = Array.from(
  { length: 12 },
  (_, i) => String(i).padStart(250, "x"),
);

/** The cluster DNS: plain DNS, `cluster.local` and the service CIDR's reverse zone. */
export const CLUSTER_DNS: UnboundOptions = {
  plain: true,
  zone: "cluster.local",
  moreZones: ["96.10.in-addr.arpa."],
  localData: [
    "cluster.local. 30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30",
    `${SERVICE} 1 IN A ${SERVICE_IP}`,
    `_http._tcp.${SERVICE} 30 IN SRV 0 100 80 ${SERVICE}`,
    `big.shop.svc.cluster.local. 30 IN TXT ${BIG_TXT_STRINGS.map((s) => `"${s}"`).join(" ")}`,
    `20.0.96.10.in-addr.arpa. 30 IN PTR ${SERVICE}`,
  ],
};

/** The default DoT upstream: logs every query; a sentinel for the cluster's names. */
export const PUBLIC_DOT: UnboundOptions = {
  zone: "unbound.test",
  moreZones: ["cluster.local.", "96.10.in-addr.arpa."],
  localData: [
    `${PUBLIC_NAME} 300 IN A 192.0.2.10`,
    `${SERVICE} 300 IN A ${SENTINEL_IP}`,
    "20.0.96.10.in-addr.arpa. 300 IN PTR leaked.sentinel.",
  ],
  extraServerConfig: ["  log-queries: yes"],
};

/**
 * The queries an Unbound with `log-queries` logged in `stderr`, but the proxy's health
 * checks (`. NS`).
 */
export function loggedQueries(stderr: string): string[] {
  return stderr.split("\n").filter((line) => / IN$/.test(line) && !/ \. NS IN$/.test(line));
}

/** The lines of `logged` that name the cluster, its service CIDR, or a special-use name. */
export function leaks(logged: string[]): string[] {
  return logged.filter((line) =>
    /cluster\.local|in-addr\.arpa|onion\.|localhost\.|home\.arpa|\.local\./i.test(line)
  );
}
