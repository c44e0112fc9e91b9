/**
 * The server certificate shared by every listener that speaks TLS to clients (DoT, DoH):
 * read from `DOTPROXY_TLS_CERT` and `DOTPROXY_TLS_KEY` as PEM text, checked once at start,
 * described in the log, watched for expiry, exported as a metric.
 *
 * The API is four functions and a class:
 * - {@linkcode checkCertificateText} and {@linkcode checkKeyText}: the form of one variable
 *   (the settings table's parsers), so a path, an encrypted key or text that is not PEM fails
 *   at start even before a listener asks for them;
 * - {@linkcode loadServerCertificate}: both together, required once any TLS listener is
 *   configured (missing, unreadable, a key that does not belong to the certificate); the
 *   result is what `Deno.listenTls` takes plus the names and dates read from the leaf;
 * - {@linkcode CertificateMonitor}: one info line per TLS listener at start, and a warning at
 *   start and every day while the certificate is expired or expires within
 *   {@linkcode EXPIRY_WARNING_DAYS} days, on the proxy's {@linkcode TimerQueue};
 * - {@linkcode registerCertificateMetrics}: the gauge
 *   `dotproxy_tls_certificate_expiry_timestamp_seconds`.
 *
 * Errors are {@linkcode CertificateError}s whose message is one line starting with the
 * variable's name; `config.ts` turns them into configuration errors (exit code 2).
 *
 * Why the text and never a path: dotproxy runs with `--allow-net --allow-env` only, and a key
 * given on the command line would show in every process list.
 *
 * @module
 */

import { createPrivateKey, type KeyObject, X509Certificate } from "node:crypto";
import type { Logger } from "../log.ts";
import type { Gauge, Registry } from "../metrics.ts";
import type { Timed, TimerQueue } from "../timers.ts";

/** The variable that holds the certificate chain. */
export const CERT_VARIABLE = "DOTPROXY_TLS_CERT";
/** The variable that holds the private key. */
export const KEY_VARIABLE = "DOTPROXY_TLS_KEY";

/** A certificate that expires within this many days is warned about, at start and daily. */
export const EXPIRY_WARNING_DAYS = 7;

/** How often the expiry is looked at again while the process runs. */
export const EXPIRY_CHECK_INTERVAL_MS = 24 * 60 * 60 * 1000;

const DAY_MS = 24 * 60 * 60 * 1000;

/** A certificate or key the proxy cannot serve with; the message names the variable. */
export class CertificateError extends Error {
  /** The variable at fault. */
  readonly variable: string;

  /** `message` is the whole line shown to the user, starting with `variable`. */
  constructor(variable: string, message: string) {
    super(`${variable}: ${message}`);
    this.name = "CertificateError";
    this.variable = variable;
  }
}

/** A certificate chain and its key, checked, with what the leaf says about itself. */
export interface ServerCertificate {
  /** The chain as PEM text, leaf first, as `Deno.listenTls({ cert })` takes it. */
  readonly cert: string;
  /** The private key as PEM text, as `Deno.listenTls({ key })` takes it. */
  readonly key: string;
  /** The leaf's subject, such as `CN=dns.example`. */
  readonly subject: string;
  /** The leaf's subjectAltName entries, DNS names and IP addresses, in order. */
  readonly names: readonly string[];
  /** The DNS names among {@linkcode names} (DDR's target is the first). */
  readonly dnsNames: readonly string[];
  /** Start of validity, milliseconds since the Unix epoch. */
  readonly notBeforeMs: number;
  /** End of validity, milliseconds since the Unix epoch. */
  readonly notAfterMs: number;
}

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----([\s\S]*?)-----END \1-----/g;
const KEY_LABELS = ["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"];

/** A value that looks like a file name rather than PEM text. */
function looksLikePath(text: string): boolean {
  return !text.includes("-----") && !/\s/.test(text) &&
    (/^(\/|\.{1,2}\/|~\/)/.test(text) || /\.(pem|crt|cer|key|cert)$/i.test(text));
}

function pathHint(variable: string, text: string): CertificateError {
  return new CertificateError(
    variable,
    `"${text}" looks like a file path; dotproxy reads no files (it has no read permission): ` +
      `pass the PEM text, e.g. ${variable}="$(cat ${text})"`,
  );
}

function notPem(variable: string, text: string, what: string): CertificateError {
  const shown = text.length > 40 ? `${text.slice(0, 40)}...` : text;
  return new CertificateError(variable, `no PEM ${what} found in ${JSON.stringify(shown)}`);
}

/** The PEM blocks of `text`: label and body, in order. */
function pemBlocks(text: string): { label: string; block: string }[] {
  return [...text.matchAll(PEM_BLOCK)].map((m) => ({ label: m[1], block: m[0] }));
}

/** The X.509 certificates of a chain, leaf first; throws {@linkcode CertificateError}. */
function parseChain(text: string, variable: string): X509Certificate[] {
  const trimmed = text.trim();
  if (trimmed === "") throw new CertificateError(variable, "empty");
  if (looksLikePath(trimmed)) throw pathHint(variable, trimmed);
  const blocks = pemBlocks(trimmed);
  if (blocks.length === 0) throw notPem(variable, trimmed, "certificate");
  const keyBlock = blocks.find((b) => b.label.includes("PRIVATE KEY"));
  if (keyBlock !== undefined) {
    throw new CertificateError(
      variable,
      `holds a private key (${keyBlock.label}); the key goes in ${KEY_VARIABLE}`,
    );
  }
  const certificates: X509Certificate[] = [];
  for (const [i, { label, block }] of blocks.entries()) {
    if (label !== "CERTIFICATE") {
      throw new CertificateError(variable, `block ${i + 1} is a ${label}, not a CERTIFICATE`);
    }
    try {
      certificates.push(new X509Certificate(block));
    } catch (error) {
      throw new CertificateError(
        variable,
        `certificate ${i + 1} cannot be read (${error instanceof Error ? error.message : error})`,
      );
    }
  }
  return certificates;
}

/** The private key of `text`; throws {@linkcode CertificateError}. */
function parseKey(text: string, variable: string): KeyObject {
  const trimmed = text.trim();
  if (trimmed === "") throw new CertificateError(variable, "empty");
  if (looksLikePath(trimmed)) throw pathHint(variable, trimmed);
  const blocks = pemBlocks(trimmed);
  if (blocks.length === 0) throw notPem(variable, trimmed, "private key");
  const encrypted = blocks.some((b) =>
    b.label === "ENCRYPTED PRIVATE KEY" || /Proc-Type:\s*4,ENCRYPTED/i.test(b.block)
  );
  if (encrypted) {
    throw new CertificateError(
      variable,
      "the private key is encrypted; dotproxy takes no passphrase: decrypt it " +
        "(openssl pkey -in key.pem -out plain.pem) and keep it in a secret store instead",
    );
  }
  const keys = blocks.filter((b) => KEY_LABELS.includes(b.label));
  if (keys.length === 0) {
    const labels = blocks.map((b) => b.label).join(", ");
    const hint = labels.includes("CERTIFICATE") ? `; the certificate goes in ${CERT_VARIABLE}` : "";
    throw new CertificateError(variable, `no private key found (PEM blocks: ${labels})${hint}`);
  }
  if (keys.length > 1) {
    throw new CertificateError(variable, `${keys.length} private keys found; give exactly one`);
  }
  try {
    return createPrivateKey(keys[0].block);
  } catch (error) {
    throw new CertificateError(
      variable,
      `the private key cannot be read (${error instanceof Error ? error.message : error})`,
    );
  }
}

/**
 * Checks the form of `DOTPROXY_TLS_CERT`: PEM certificates only, each readable; not a path,
 * not a key. Throws {@linkcode CertificateError} naming `variable`.
 *
 * @example
 * ```ts
 * import { checkCertificateText } from "./certificate.ts";
 * try {
 *   checkCertificateText("/etc/tls/cert.pem", "DOTPROXY_TLS_CERT");
 * } catch (error) {
 *   // DOTPROXY_TLS_CERT: "/etc/tls/cert.pem" looks like a file path; ... "$(cat /etc/tls/cert.pem)"
 * }
 * ```
 */
export function checkCertificateText(text: string, variable: string = CERT_VARIABLE): void {
  parseChain(text, variable);
}

/**
 * Checks the form of `DOTPROXY_TLS_KEY`: one unencrypted PEM private key (PKCS #8, SEC1 or
 * PKCS #1); not a path. Throws {@linkcode CertificateError} naming `variable`.
 *
 * @example
 * ```ts
 * import { checkKeyText } from "./certificate.ts";
 * try {
 *   checkKeyText(Deno.env.get("DOTPROXY_TLS_KEY") ?? "", "DOTPROXY_TLS_KEY");
 * } catch (error) {
 *   // DOTPROXY_TLS_KEY: empty (when the variable is unset)
 * }
 * ```
 */
export function checkKeyText(text: string, variable: string = KEY_VARIABLE): void {
  parseKey(text, variable);
}

/** The subjectAltName entries of `leaf`: `DNS:a, IP Address:1.2.3.4` as `["a", "1.2.3.4"]`. */
function altNames(leaf: X509Certificate): { names: string[]; dnsNames: string[] } {
  const names: string[] = [];
  const dnsNames: string[] = [];
  for (const entry of (leaf.subjectAltName ?? "").split(",")) {
    const item = entry.trim();
    const colon = item.indexOf(":");
    if (colon < 0) continue;
    const kind = item.slice(0, colon);
    const value = item.slice(colon + 1);
    if (kind === "DNS") {
      names.push(value);
      dnsNames.push(value);
    } else if (kind === "IP Address") {
      names.push(value);
    }
  }
  return { names, dnsNames };
}

/**
 * Reads and checks the server certificate, as needed once any TLS listener is configured:
 * both variables set, each of the right form, and the key the one of the leaf certificate
 * (the first in the chain). Throws {@linkcode CertificateError} naming the variable at fault.
 *
 * @example
 * ```ts ignore
 * const certificate = loadServerCertificate(config.tlsCert, config.tlsKey);
 * Deno.listenTls({ port: 853, cert: certificate.cert, key: certificate.key });
 * ```
 */
export function loadServerCertificate(certText: string, keyText: string): ServerCertificate {
  const missing = (variable: string, what: string) =>
    new CertificateError(
      variable,
      `not set; a TLS listener needs the ${what} as PEM text (${variable}="$(cat FILE)")`,
    );
  if (certText.trim() === "") throw missing(CERT_VARIABLE, "certificate chain");
  if (keyText.trim() === "") throw missing(KEY_VARIABLE, "private key");
  const chain = parseChain(certText, CERT_VARIABLE);
  const key = parseKey(keyText, KEY_VARIABLE);
  const leaf = chain[0];
  let matches: boolean;
  try {
    matches = leaf.checkPrivateKey(key);
  } catch {
    // Keys of different algorithms (an RSA key for an EC certificate) throw rather than
    // return false.
    matches = false;
  }
  if (!matches) {
    const shown = leaf.subjectAltName ?? leaf.subject;
    throw new CertificateError(
      KEY_VARIABLE,
      `the private key does not belong to the certificate in ${CERT_VARIABLE} ` +
        `(${shown}; a ${key.asymmetricKeyType} key)`,
    );
  }
  const { names, dnsNames } = altNames(leaf);
  return {
    cert: certText.trim() + "\n",
    key: keyText.trim() + "\n",
    subject: leaf.subject.replace(/\n/g, ", "),
    names,
    dnsNames,
    notBeforeMs: Date.parse(leaf.validFrom),
    notAfterMs: Date.parse(leaf.validTo),
  };
}

/**
 * What is wrong with the certificate's dates at `nowMs` (wall clock), or null: expired, not
 * valid yet, or expiring within {@linkcode EXPIRY_WARNING_DAYS} days.
 *
 * @example
 * ```ts ignore
 * expiryProblem(certificate, Date.now()); // "expires in 3 days (2026-12-11T00:00:00.000Z)"
 * ```
 */
export function expiryProblem(certificate: ServerCertificate, nowMs: number): string | null {
  const expires = new Date(certificate.notAfterMs).toISOString();
  const left = certificate.notAfterMs - nowMs;
  if (left <= 0) {
    const days = Math.floor(-left / DAY_MS);
    return `expired ${days === 0 ? "less than a day" : days === 1 ? "1 day" : `${days} days`} ` +
      `ago (${expires}); clients refuse it`;
  }
  if (nowMs < certificate.notBeforeMs) {
    return `not valid before ${new Date(certificate.notBeforeMs).toISOString()}; clients ` +
      "refuse it until then (is the clock right?)";
  }
  if (left <= EXPIRY_WARNING_DAYS * DAY_MS) {
    const hours = Math.floor(left / (60 * 60 * 1000));
    const when = hours < 48 ? `${hours} hours` : `${Math.floor(left / DAY_MS)} days`;
    return `expires in ${when} (${expires}); renew it and restart`;
  }
  return null;
}

/** What {@linkcode CertificateMonitor} needs. */
export interface CertificateMonitorOptions {
  /** The certificate served. */
  certificate: ServerCertificate;
  /** Each TLS listener, as `dot 127.0.0.1:853` or `doh [::]:443`: one info line each. */
  listeners: readonly string[];
  /** Where the lines go. */
  log: Logger;
  /** The proxy's timers; the daily check is one entry there (closed with the queue). */
  timers: TimerQueue;
  /** The wall clock, milliseconds since the Unix epoch (tests move it). */
  wallClock?: () => number;
}

/**
 * Logs the certificate once per TLS listener at start, and warns at start and every
 * {@linkcode EXPIRY_CHECK_INTERVAL_MS} while {@linkcode expiryProblem} finds one. The daily
 * check is an entry in the proxy's {@linkcode TimerQueue}: it keeps no platform timer of its
 * own and stops with {@linkcode CertificateMonitor.close} or the queue.
 *
 * @example
 * ```ts ignore
 * const monitor = new CertificateMonitor({ certificate, listeners: ["doh 0.0.0.0:443"], log, timers });
 * monitor.close();
 * ```
 */
export class CertificateMonitor {
  readonly #options: CertificateMonitorOptions;
  readonly #wallClock: () => number;
  /** The daily check's entry in the timer queue. */
  readonly #daily: Timed = {
    timerAt: 0,
    timerIndex: -1,
    timerSlot: -1,
    onTimer: () => {
      if (!this.#closed) this.#check();
    },
  };
  #closed = false;

  /** Logs at once and schedules the daily check. */
  constructor(options: CertificateMonitorOptions) {
    this.#options = options;
    this.#wallClock = options.wallClock ?? Date.now;
    const { certificate, listeners, log } = options;
    for (const listener of listeners) {
      log.info("tls listener certificate", {
        listener,
        names: certificate.names.join(","),
        subject: certificate.subject,
        expires: new Date(certificate.notAfterMs).toISOString(),
      });
    }
    this.#check();
  }

  #check(): void {
    const { certificate, log, timers } = this.#options;
    const problem = expiryProblem(certificate, this.#wallClock());
    if (problem !== null) {
      log.warn(`tls certificate ${problem}`, {
        names: certificate.names.join(","),
        expires: new Date(certificate.notAfterMs).toISOString(),
      });
    }
    timers.schedule(this.#daily, timers.clock.now() + EXPIRY_CHECK_INTERVAL_MS);
  }

  /** Stops the daily check. */
  close(): void {
    this.#closed = true;
    this.#options.timers.cancel(this.#daily);
  }
}

/** The gauge's name. */
export const EXPIRY_METRIC = "dotproxy_tls_certificate_expiry_timestamp_seconds";

/**
 * Registers `dotproxy_tls_certificate_expiry_timestamp_seconds{name}` in `registry`: the
 * served certificate's end of validity in Unix seconds, labelled with its first name. With no
 * certificate (no TLS listener) the family is declared with no series, so an alert on it
 * stays silent rather than seeing an expiry at 0.
 *
 * @example
 * ```ts ignore
 * registerCertificateMetrics(metrics.registry, certificate);
 * ```
 */
export function registerCertificateMetrics(
  registry: Registry,
  certificate: ServerCertificate | null,
): Gauge {
  const gauge = registry.gauge(
    EXPIRY_METRIC,
    "End of validity of the certificate served to DoT and DoH clients, in seconds since the " +
      "Unix epoch (from DOTPROXY_TLS_CERT); alert on it minus time() falling under 14 days.",
    ["name"],
  );
  if (certificate !== null) {
    const name = certificate.names[0] ?? certificate.subject;
    gauge.labels(name).set(Math.floor(certificate.notAfterMs / 1000));
  }
  return gauge;
}
