/**
 * Test certificates made on the spot with `openssl` in a temporary directory, signed by the
 * test CA of tests/fixtures: expired, expiring, with an encrypted key, with EC (SEC1) or RSA
 * keys. Leaf certificates are `CA:FALSE` (rustls refuses a CA certificate as a server's).
 *
 * @module
 */

import { CA_KEY, CA_PEM } from "../fixtures/certs.ts";

/** A certificate and its key, PEM text. */
export interface MadeCertificate {
  cert: string;
  key: string;
}

/** What to make. */
export interface CertificateRequest {
  /** subjectAltName, as openssl writes it. */
  san?: string;
  /** Valid for this many days from now (default 365). */
  days?: number;
  /** Or a validity window: `YYYYMMDDHHMMSSZ`. */
  startDate?: string;
  /** End of the window, `YYYYMMDDHHMMSSZ`. */
  endDate?: string;
  /** Key type (default EC P-256). */
  keyType?: "ec" | "rsa";
  /** How the key is written: PKCS #8 (default), traditional (SEC1 / PKCS #1) or encrypted. */
  keyForm?: "pkcs8" | "traditional" | "encrypted" | "encrypted-traditional";
}

/** True when `openssl` runs here; tests that need it skip with a reason otherwise. */
export async function hasOpenssl(): Promise<boolean> {
  try {
    const out = await new Deno.Command("openssl", { args: ["version"], stdout: "null" }).output();
    return out.success;
  } catch {
    return false;
  }
}

async function run(args: string[], cwd: string): Promise<void> {
  const out = await new Deno.Command("openssl", { args, cwd, stdout: "piped", stderr: "piped" })
    .output();
  if (!out.success) {
    throw new Error(`openssl ${args[0]} failed: ${new TextDecoder().decode(out.stderr)}`);
  }
}

/** Makes a leaf certificate signed by the test CA. */
export async function makeCertificate(request: CertificateRequest = {}): Promise<MadeCertificate> {
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "dotproxy-cert-" });
  try {
    await Deno.writeTextFile(`${dir}/ca.pem`, CA_PEM);
    await Deno.writeTextFile(`${dir}/ca.key`, CA_KEY);
    const keyType = request.keyType ?? "ec";
    await run(
      keyType === "ec"
        ? ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "leaf.key"]
        : ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "leaf.key"],
      dir,
    );
    await run(
      ["req", "-new", "-key", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=made.test"],
      dir,
    );
    const san = request.san ?? "DNS:made.test,DNS:localhost,IP:127.0.0.1";
    await Deno.writeTextFile(
      `${dir}/leaf.ext`,
      `subjectAltName=${san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature` +
        `\nextendedKeyUsage=serverAuth\n`,
    );
    if (request.startDate !== undefined || request.endDate !== undefined) {
      // `openssl x509` takes only a number of days from now; `openssl ca` takes dates.
      await Deno.writeTextFile(`${dir}/index.txt`, "");
      await Deno.writeTextFile(`${dir}/serial`, "1000\n");
      await Deno.writeTextFile(
        `${dir}/ca.cnf`,
        `[ca]\ndefault_ca=d\n[d]\ndir=${dir}\ndatabase=${dir}/index.txt\n` +
          `new_certs_dir=${dir}\nserial=${dir}/serial\ndefault_md=sha256\npolicy=p\n` +
          `unique_subject=no\n[p]\ncommonName=supplied\n`,
      );
      await run([
        "ca",
        "-batch",
        "-notext",
        "-config",
        "ca.cnf",
        "-cert",
        "ca.pem",
        "-keyfile",
        "ca.key",
        "-in",
        "leaf.csr",
        "-out",
        "leaf.pem",
        "-extfile",
        "leaf.ext",
        "-startdate",
        request.startDate ?? "20200101000000Z",
        "-enddate",
        request.endDate ?? "20991231000000Z",
      ], dir);
    } else {
      await run([
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        String(request.days ?? 365),
        "-extfile",
        "leaf.ext",
        "-out",
        "leaf.pem",
      ], dir);
    }
    const form = request.keyForm ?? "pkcs8";
    if (form === "traditional") {
      // SEC1 (`EC PRIVATE KEY`) or PKCS #1 (`RSA PRIVATE KEY`).
      const traditional = keyType === "rsa" ? ["-traditional"] : [];
      await run([keyType, "-in", "leaf.key", ...traditional, "-out", "out.key"], dir);
    } else if (form === "encrypted-traditional") {
      // `Proc-Type: 4,ENCRYPTED` in an `EC PRIVATE KEY` block.
      await run(
        ["ec", "-in", "leaf.key", "-aes256", "-passout", "pass:secret", "-out", "out.key"],
        dir,
      );
    } else if (form === "encrypted") {
      await run([
        "pkey",
        "-in",
        "leaf.key",
        "-aes256",
        "-passout",
        "pass:secret",
        "-out",
        "out.key",
      ], dir);
    } else {
      await run(["pkey", "-in", "leaf.key", "-out", "out.key"], dir);
    }
    const cert = await Deno.readTextFile(`${dir}/leaf.pem`);
    const key = await Deno.readTextFile(`${dir}/out.key`);
    return { cert, key };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
