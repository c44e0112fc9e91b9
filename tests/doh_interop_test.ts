/**
 * dotproxy's DoH listeners with real servers around them (loopback only; each test skips
 * with a visible reason when its tool is missing):
 * - dnsdist 1.7 in front, with dotproxy as its DoH backend (`newServer` with `dohPath`);
 * - nginx in front terminating TLS (HTTP/2), proxying to `--listen-doh-plain` over
 *   HTTP/1.1 keep-alive with `X-Forwarded-For`: the snippet docs/doh.md gives.
 *
 * @module
 */

import assert from "node:assert/strict";
import { parseCidr } from "../src/config.ts";
import { SERVER_KEY, SERVER_PEM } from "./fixtures/certs.ts";
import { hasTool, named, run, withDoh } from "./support/doh.ts";
import { until } from "./support/wait.ts";

const DNSDIST = await hasTool("dnsdist", ["--version"]);
const NGINX = await hasTool("nginx", ["-v"]);
const KDIG = await hasTool("kdig", ["--version"]);
const DIG = await hasTool("dig", ["-v"]);
const CA_FILE = new URL("./fixtures/ca.pem", import.meta.url).pathname;

/** A port free a moment ago (the servers started here take a port number, not a socket). */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}

/** Runs `command` until `fn` is done, then stops it with SIGTERM. */
async function withServer(
  command: string,
  args: string[],
  fn: () => Promise<void>,
): Promise<void> {
  const child = new Deno.Command(command, { args, stdout: "piped", stderr: "piped" }).spawn();
  try {
    await fn();
  } finally {
    try {
      child.kill("SIGTERM");
    } catch {
      // Exited already.
    }
    const out = await child.output();
    void out;
  }
}

Deno.test({
  name: named(
    "interop: dnsdist 1.7 in front, dotproxy as its DoH backend",
    DNSDIST && DIG,
    "dnsdist or dig",
  ),
  ignore: !(DNSDIST && DIG),
  async fn() {
    await withDoh(async ({ tlsPort, upstream }) => {
      const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "dotproxy-dnsdist-" });
      const port = freePort();
      try {
        await Deno.writeTextFile(
          `${dir}/dnsdist.conf`,
          `setLocal("127.0.0.1:${port}")\nsetSecurityPollSuffix("")\n` +
            `newServer({address="127.0.0.1:${tlsPort}", tls="openssl", subjectName="dns.test", ` +
            `dohPath="/dns-query", caStore="${CA_FILE}", validateCertificates=true})\n`,
        );
        await withServer(
          "dnsdist",
          ["--supervised", "--disable-syslog", "-C", `${dir}/dnsdist.conf`],
          async () => {
            const answered = await until(
              async () => {
                const out = await run("dig", [
                  "@127.0.0.1",
                  "-p",
                  String(port),
                  "+tries=1",
                  "+time=1",
                  "dnsdist.example",
                ]);
                return /status: NOERROR/.test(new TextDecoder().decode(out.stdout));
              },
              30_000,
              100,
            );
            assert.ok(answered, "no answer through dnsdist");
            for (const transport of ["+notcp", "+tcp"]) {
              const out = await run("dig", [
                "@127.0.0.1",
                "-p",
                String(port),
                transport,
                `${transport.slice(1)}.dnsdist.example`,
              ]);
              assert.match(
                new TextDecoder().decode(out.stdout),
                /dnsdist\.example\.\s+\d+\s+IN\s+A\s+10\./,
              );
            }
          },
        );
        assert.ok(upstream.queries >= 3);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});

/** The nginx server block of docs/doh.md, with test paths and ports. */
function nginxConfig(dir: string, port: number, plainPort: number): string {
  return `daemon off;
master_process off;
worker_processes 1;
error_log ${dir}/error.log info;
pid ${dir}/nginx.pid;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  upstream dotproxy {
    server 127.0.0.1:${plainPort};
    keepalive 16;
  }
  server {
    listen 127.0.0.1:${port} ssl http2;
    ssl_certificate ${dir}/server.pem;
    ssl_certificate_key ${dir}/server.key;
    location = /dns-query {
      proxy_pass http://dotproxy;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }
  }
}
`;
}

Deno.test({
  name: named(
    "interop: nginx in front (TLS, HTTP/2) of --listen-doh-plain, X-Forwarded-For believed",
    NGINX && KDIG,
    "nginx or kdig",
  ),
  ignore: !(NGINX && KDIG),
  async fn() {
    // The clients are all on loopback: 127.0.0.2 stands for a client nginx reports, and the
    // access list lets only it in, so an answer proves the header was read.
    await withDoh(async ({ plainPort, upstream }) => {
      const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "dotproxy-nginx-" });
      const port = freePort();
      try {
        await Deno.writeTextFile(`${dir}/server.pem`, SERVER_PEM);
        await Deno.writeTextFile(`${dir}/server.key`, SERVER_KEY);
        await Deno.writeTextFile(`${dir}/nginx.conf`, nginxConfig(dir, port, plainPort));
        await withServer("nginx", ["-p", dir, "-c", `${dir}/nginx.conf`], async () => {
          const ask = (name: string, extra: string[] = []) =>
            run("kdig", [
              "@127.0.0.1",
              "-p",
              String(port),
              "+https",
              `+tls-ca=${CA_FILE}`,
              "+tls-hostname=dns.test",
              ...extra,
              name,
            ]);
          const up = await until(
            async () =>
              /HTTP\/2-POST/.test(new TextDecoder().decode((await ask("up.example")).stdout)),
            30_000,
            100,
          );
          assert.ok(up, "nginx did not come up");
          // From 127.0.0.1 (nginx's peer and client alike): refused by --allow.
          const refused = new TextDecoder().decode((await ask("refused.example")).stdout);
          assert.match(refused, /status: REFUSED/);
          // kdig cannot add a header; curl can: 127.0.0.2, then nginx appends 127.0.0.1.
          const curl = await run("curl", [
            "-s",
            "--http2",
            "--cacert",
            CA_FILE,
            "-H",
            "x-forwarded-for: 127.0.0.2",
            "-o",
            `${dir}/answer`,
            "-w",
            "%{http_code}",
            `https://localhost:${port}/dns-query?dns=AAABAAABAAAAAAAABW5naW54B2V4YW1wbGUAAAEAAQ`,
          ]);
          assert.equal(new TextDecoder().decode(curl.stdout), "200");
          const answer = await Deno.readFile(`${dir}/answer`);
          assert.equal(answer[3] & 0x0f, 0, "the forwarded client was not the one let in");
        });
        assert.ok(upstream.queries >= 1);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    }, {
      allow: [parseCidr("127.0.0.2", "--allow")],
      trustedProxies: [parseCidr("127.0.0.1", "--trusted-proxy")],
      // --allow given explicitly: the plain listener may be anywhere; here it is loopback.
    });
  },
});
