/**
 * End to end with the resolver most programs use: glibc's `getent ahosts` in a network and
 * mount namespace (`unshare -rmn`) whose /etc/resolv.conf is what Kubernetes writes for a
 * pod (`search <ns>.svc.cluster.local svc.cluster.local cluster.local`, `ndots:5`) with
 * dotproxy on 127.0.0.1:53 as its nameserver, the cluster DNS a plain-DNS Unbound, the
 * default upstream a DoT Unbound. A short service name resolves through the search list
 * to the cluster DNS, a public name through DoT, and no cluster name reaches DoT.
 *
 * Skips, saying why, where namespaces, getent, ip, dig or unbound are not available.
 */

import assert from "node:assert/strict";
import { CA_PEM } from "./fixtures/certs.ts";
import {
  CLUSTER_DNS,
  leaks,
  loggedQueries,
  PUBLIC_DOT,
  SENTINEL_IP,
  SERVICE_CIDR,
  SERVICE_IP,
} from "./support/cluster.ts";
import { writeUnboundDir } from "./support/unbound.ts";

async function runs(command: string, args: string[]): Promise<boolean> {
  try {
    const output = await new Deno.Command(command, { args, stdout: "null", stderr: "null" })
      .output();
    return output.success;
  } catch {
    return false;
  }
}

async function whyNot(): Promise<string | null> {
  for (const tool of ["getent", "ip", "dig", "unbound"]) {
    if (!await runs("sh", ["-c", `command -v ${tool}`])) return `${tool} is not installed`;
  }
  if (!await runs("unshare", ["-rmn", "true"])) {
    return "unshare -rmn failed (no user, mount or network namespaces here)";
  }
  return null;
}

const skipReason = await whyNot();
if (skipReason !== null) console.warn(`getent_namespace_test: skipped: ${skipReason}`);

const CLUSTER_PORT = 5354;
const DOT_PORT = 8853;

Deno.test({
  name:
    "getent in a pod-like namespace: a short service name via the search list, a public name via DoT",
  ignore: skipReason !== null,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "dotproxy-netns-" });
    const clusterDir = await writeUnboundDir(CLUSTER_PORT, CLUSTER_DNS);
    const dotDir = await writeUnboundDir(DOT_PORT, PUBLIC_DOT);
    try {
      await Deno.writeTextFile(
        `${dir}/resolv.conf`,
        "search shop.svc.cluster.local svc.cluster.local cluster.local\n" +
          "nameserver 127.0.0.1\noptions ndots:5\n",
      );
      await Deno.writeTextFile(`${dir}/ca.pem`, CA_PEM);
      const main = new URL("../main.ts", import.meta.url).pathname;
      const script = [
        "set -u",
        "ip link set lo up",
        `mount --bind ${dir}/resolv.conf /etc/resolv.conf`,
        `unbound -d -c ${clusterDir}/unbound.conf 2>${dir}/cluster.log &`,
        `unbound -d -c ${dotDir}/unbound.conf 2>${dir}/dot.log &`,
        `DENO_NO_UPDATE_CHECK=1 DOTPROXY_CA_CERTS="$(cat ${dir}/ca.pem)" ${Deno.execPath()} run ` +
        `--allow-net --allow-env ${main} --listen 127.0.0.1:53 ` +
        `--upstream 127.0.0.1:${DOT_PORT}#dns.test ` +
        `--zone cluster.local,${SERVICE_CIDR}=dns://127.0.0.1:${CLUSTER_PORT} 2>${dir}/proxy.log &`,
        // Ready: the proxy answers, and the DoT upstream through it.
        "for i in $(seq 1 100); do",
        "  dig +short +time=1 +tries=1 @127.0.0.1 www.unbound.test | grep -q 192.0.2.10 && break",
        "  sleep 0.1",
        "done",
        "echo '== orders'; getent ahosts orders; echo \"rc=$?\"",
        "echo '== public'; getent ahosts www.unbound.test; echo \"rc=$?\"",
        "echo '== reverse'; getent hosts 10.96.0.20; echo \"rc=$?\"",
        "kill $(jobs -p); wait",
      ].join("\n");
      await Deno.writeTextFile(`${dir}/run.sh`, script);
      const output = await new Deno.Command("timeout", {
        args: ["60", "unshare", "-rmn", "bash", `${dir}/run.sh`],
        stdout: "piped",
        stderr: "piped",
      }).output();
      const out = new TextDecoder().decode(output.stdout);
      if (Deno.env.get("SHOW_NETNS")) console.log(out);
      const proxyLog = await Deno.readTextFile(`${dir}/proxy.log`).catch(() => "");
      const context = `${out}\n--- proxy log:\n${proxyLog.slice(-3000)}`;
      const section = (name: string) => out.split(`== ${name}\n`)[1]?.split("\n== ")[0] ?? "";
      assert.match(
        section("orders"),
        new RegExp(`^${SERVICE_IP.replaceAll(".", "\\.")} `, "m"),
        context,
      );
      assert.ok(!section("orders").includes(SENTINEL_IP), "not the public upstream's answer");
      assert.match(section("orders"), /rc=0/, context);
      assert.match(section("public"), /^192\.0\.2\.10 /m, context);
      assert.match(section("public"), /rc=0/, context);
      assert.match(section("reverse"), /orders\.shop\.svc\.cluster\.local/, context);
      const dotLog = loggedQueries(await Deno.readTextFile(`${dir}/dot.log`));
      assert.ok(dotLog.some((line) => line.includes("www.unbound.test.")), dotLog.join("\n"));
      assert.deepEqual(leaks(dotLog), [], "the search list's cluster names never reached DoT");
    } finally {
      for (const path of [dir, clusterDir, dotDir]) {
        await Deno.remove(path, { recursive: true }).catch(() => {});
      }
    }
  },
});
