/**
 * The router (`src/upstream/router.ts`) and its zone table: the longest zone wins, labels
 * match whole and in any case, DS goes by its parent, any `--zone` beats the special-use
 * names, and every question counts under its route.
 */

import assert from "node:assert/strict";
import { type Route, Router } from "../src/upstream/router.ts";
import type { Forwarder, UpstreamRequest } from "../src/upstream/forwarder.ts";
import { SpecialUseNames } from "../src/upstream/special_use.ts";
import { buildQuery } from "./support/dns.ts";

/** A request that only carries its question. */
class Question implements UpstreamRequest {
  readonly query: Uint8Array;
  readonly questionEnd: number;
  readonly deadline = 0;
  keepTtls = false;
  constructor(name: string, type = 1) {
    this.query = buildQuery(name, { type });
    this.questionEnd = this.query.length;
  }
  settleAnswer(): void {}
  settleFailure(): void {}
}

/** A forwarder that remembers what it was handed. */
function recorder(label: string, keepTtls = true): Route & { seen: UpstreamRequest[] } {
  const seen: UpstreamRequest[] = [];
  const forwarder: Forwarder = {
    forward: (request) => void seen.push(request),
    close() {},
  };
  return { label, forwarder, keepTtls, seen };
}

function routeOf(router: Router, name: string, type = 1): string {
  const question = new Question(name, type);
  return router.route(question.query, question.questionEnd).label;
}

Deno.test("router: the longest zone wins, whole labels, any case", () => {
  const fallback = recorder("default", false);
  const router = new Router(fallback);
  router.addZone("cluster.local", recorder("cluster.local"));
  router.addZone("svc.cluster.local", recorder("svc.cluster.local"));
  router.addZone("96.10.in-addr.arpa", recorder("10.96.0.0/12"));
  const cases: [string, string][] = [
    ["cluster.local", "cluster.local"],
    ["Orders.NS.SVC.Cluster.LOCAL", "svc.cluster.local"],
    ["pod.cluster.local", "cluster.local"],
    ["mycluster.local", "default"],
    ["cluster.local.evil", "default"],
    ["local", "default"],
    ["10.0.96.10.in-addr.arpa", "10.96.0.0/12"],
    ["10.0.97.10.in-addr.arpa", "default"],
    ["www.example.com", "default"],
    [".", "default"],
  ];
  for (const [name, label] of cases) assert.equal(routeOf(router, name), label, name);
});

Deno.test("router: a DS question goes by its name minus the first label", () => {
  const router = new Router(recorder("default", false));
  router.addZone("corp.example", recorder("corp.example"));
  assert.equal(
    routeOf(router, "sub.corp.example", 43),
    "corp.example",
    "the parent is in the zone",
  );
  assert.equal(routeOf(router, "corp.example", 43), "default", "the zone's own DS: its parent");
  assert.equal(routeOf(router, "corp.example", 1), "corp.example");
  assert.equal(routeOf(router, "x.sub.corp.example", 43), "corp.example");
});

Deno.test("router: special-use names unless a zone, of any length, holds them", () => {
  const withSpecial = new Router(recorder("default", false), new SpecialUseNames());
  for (
    const name of [
      "localhost",
      "db.localhost",
      "x.invalid",
      "facebookcorewwwi.onion",
      "printer.local",
      "nas.home.arpa",
      "1.0.168.192.in-addr.arpa",
      "5.4.64.100.in-addr.arpa",
      "9.9.127.100.in-addr.arpa",
      "1.1.16.172.in-addr.arpa",
      "1.0.0.127.in-addr.arpa",
      "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.0.0.0.0.0.d.f.ip6.arpa",
    ]
  ) {
    assert.equal(routeOf(withSpecial, name), "special-use", name);
  }
  for (const name of ["www.test", "1.1.128.100.in-addr.arpa", "1.1.32.172.in-addr.arpa", "arpa"]) {
    assert.equal(routeOf(withSpecial, name), "default", name);
  }
  withSpecial.addZone("arpa", recorder("arpa"));
  withSpecial.addZone("local", recorder("local"));
  assert.equal(routeOf(withSpecial, "1.0.168.192.in-addr.arpa"), "arpa", "a shorter --zone wins");
  assert.equal(routeOf(withSpecial, "printer.local"), "local");
  assert.equal(routeOf(withSpecial, "x.onion"), "special-use");
  const without = new Router(recorder("default", false), null);
  assert.equal(routeOf(without, "printer.local"), "default", "--special-use-names false");
});

Deno.test("router: forward hands the question to its route, counts it, marks zone answers' TTLs kept", () => {
  const counts = new Map<string, number>();
  const fallback = recorder("default", false);
  const zone = recorder("cluster.local");
  const router = new Router(fallback, new SpecialUseNames(), {
    routed: (route) => counts.set(route, (counts.get(route) ?? 0) + 1),
  });
  router.addZone("cluster.local", zone);
  const inZone = new Question("a.cluster.local");
  const outside = new Question("www.example.com");
  router.forward(inZone);
  router.forward(outside);
  router.forward(new Question("localhost"));
  assert.deepEqual(zone.seen, [inZone]);
  assert.deepEqual(fallback.seen, [outside]);
  assert.equal(inZone.keepTtls, true);
  assert.equal(outside.keepTtls, false);
  assert.deepEqual(
    Object.fromEntries(counts),
    { "cluster.local": 1, default: 1, "special-use": 1 },
  );
});
