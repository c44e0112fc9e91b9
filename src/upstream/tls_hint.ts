/**
 * What to do about a failed TLS handshake with an upstream, in the words of the settings
 * that fix it. rustls (under `Deno.startTls`) says `invalid peer certificate: UnknownIssuer`;
 * a newcomer with a private resolver needs to hear about `DOTPROXY_CA_CERTS` (issue 22).
 *
 * @module
 */

/**
 * The hint to append to a handshake error `message`, or `""` when there is none.
 * `extraCas` is how many CA certificates `DOTPROXY_CA_CERTS` added.
 *
 * @example
 * ```ts
 * import { tlsHint } from "./tls_hint.ts";
 * tlsHint("invalid peer certificate: UnknownIssuer", 0);
 * // " (the upstream's certificate is not signed by a CA dotproxy trusts: for a private CA, ..."
 * ```
 */
export function tlsHint(message: string, extraCas: number): string {
  if (/UnknownIssuer/i.test(message)) {
    return extraCas === 0
      ? " (the upstream's certificate is not signed by a CA dotproxy trusts: for a private CA, " +
        'set DOTPROXY_CA_CERTS to its PEM text, e.g. DOTPROXY_CA_CERTS="$(cat ca.pem)")'
      : " (the upstream's certificate is signed neither by a built-in root nor by the " +
        `${extraCas} CA certificate${extraCas === 1 ? "" : "s"} in DOTPROXY_CA_CERTS: ` +
        "is it the CA that signed this server's certificate?)";
  }
  if (/NotValidForName/i.test(message)) {
    return " (the certificate does not name the TLS name after #: write the name it was " +
      "issued for, IP#TLS_NAME)";
  }
  if (/Expired/i.test(message)) {
    return " (the upstream's certificate has expired, or this host's clock is wrong)";
  }
  return "";
}
