/** `src/net/ip.ts`: CIDRs as reverse zones (parsing itself is covered by config_test.ts). */

import assert from "node:assert/strict";
import { CidrError, parseCidr, reverseZones } from "../src/net/ip.ts";

Deno.test("reverseZones: octet boundaries for IPv4, nibble boundaries for IPv6", () => {
  const zones = (text: string) => reverseZones(parseCidr(text));
  assert.deepEqual(zones("10.0.0.0/8"), ["10.in-addr.arpa"]);
  const service = zones("10.96.0.0/12");
  assert.equal(service.length, 16);
  assert.equal(service[0], "96.10.in-addr.arpa");
  assert.equal(service[15], "111.10.in-addr.arpa");
  assert.equal(zones("100.64.0.0/10").length, 64);
  assert.deepEqual(zones("192.168.1.0/24"), ["1.168.192.in-addr.arpa"]);
  assert.deepEqual(zones("192.168.1.128/25").length, 128);
  assert.deepEqual(zones("192.0.2.7"), ["7.2.0.192.in-addr.arpa"]);
  assert.deepEqual(zones("0.0.0.0/0"), ["in-addr.arpa"]);
  assert.deepEqual(zones("fd00::/8"), ["d.f.ip6.arpa"]);
  assert.deepEqual(zones("fc00::/7"), ["c.f.ip6.arpa", "d.f.ip6.arpa"]);
  assert.deepEqual(zones("fe80::/10"), [
    "8.e.f.ip6.arpa",
    "9.e.f.ip6.arpa",
    "a.e.f.ip6.arpa",
    "b.e.f.ip6.arpa",
  ]);
  assert.deepEqual(zones("2001:db8::/32"), ["8.b.d.0.1.0.0.2.ip6.arpa"]);
  assert.equal(zones("::1/128")[0], `1.${"0.".repeat(31)}ip6.arpa`);
});

Deno.test("parseCidr: says what is wrong without naming the input (the caller does)", () => {
  assert.throws(
    () => parseCidr("10.0.0.1/8"),
    (e: Error) =>
      e instanceof CidrError &&
      e.message === "host bits are set after /8; did you mean 10.0.0.0/8?",
  );
  assert.throws(() => parseCidr("x/8"), CidrError);
});
