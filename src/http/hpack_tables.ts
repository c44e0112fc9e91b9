/**
 * The constant tables of HPACK (RFC 7541): the static table (Appendix A) and the Huffman
 * code (Appendix B, as the symbols of each code length), both checked equal to the
 * python3-hpack package's copies of the RFC's tables; do not edit.
 *
 * @module
 */

/** The 61 entries of the static table, index 1 first (RFC 7541 Appendix A). */
export const STATIC_TABLE: readonly (readonly [string, string])[] = [
  [":authority", ""],
  [":method", "GET"],
  [":method", "POST"],
  [":path", "/"],
  [":path", "/index.html"],
  [":scheme", "http"],
  [":scheme", "https"],
  [":status", "200"],
  [":status", "204"],
  [":status", "206"],
  [":status", "304"],
  [":status", "400"],
  [":status", "404"],
  [":status", "500"],
  ["accept-charset", ""],
  ["accept-encoding", "gzip, deflate"],
  ["accept-language", ""],
  ["accept-ranges", ""],
  ["accept", ""],
  ["access-control-allow-origin", ""],
  ["age", ""],
  ["allow", ""],
  ["authorization", ""],
  ["cache-control", ""],
  ["content-disposition", ""],
  ["content-encoding", ""],
  ["content-language", ""],
  ["content-length", ""],
  ["content-location", ""],
  ["content-range", ""],
  ["content-type", ""],
  ["cookie", ""],
  ["date", ""],
  ["etag", ""],
  ["expect", ""],
  ["expires", ""],
  ["from", ""],
  ["host", ""],
  ["if-match", ""],
  ["if-modified-since", ""],
  ["if-none-match", ""],
  ["if-range", ""],
  ["if-unmodified-since", ""],
  ["last-modified", ""],
  ["link", ""],
  ["location", ""],
  ["max-forwards", ""],
  ["proxy-authenticate", ""],
  ["proxy-authorization", ""],
  ["range", ""],
  ["referer", ""],
  ["refresh", ""],
  ["retry-after", ""],
  ["server", ""],
  ["set-cookie", ""],
  ["strict-transport-security", ""],
  ["transfer-encoding", ""],
  ["user-agent", ""],
  ["vary", ""],
  ["via", ""],
  ["www-authenticate", ""],
];

/**
 * The Huffman code (RFC 7541 Appendix B), as the symbols (octets, and 256 for EOS) that have
 * a code of each length, in code order. The code is canonical: the codes of one length are
 * consecutive in symbol order, each length's first code follows the previous length's last,
 * so these lists are the whole code.
 */
const SYMBOLS_BY_CODE_LENGTH: readonly (readonly [number, string])[] = [
  [5, "012aceiost"],
  [6, " %-./3456789=A_bdfghlmnpru"],
  [7, ":BCDEFGHIJKLMNOPQRSTUVWYjkqvwxyz"],
  [8, "&*,;XZ"],
  [10, '!"()?'],
  [11, "'+|"],
  [12, "#>"],
  [13, "\x00$@[]~"],
  [14, "^}"],
  [15, "<`{"],
  [19, "\\\xc3\xd0"],
  [20, "\x80\x82\x83\xa2\xb8\xc2\xe0\xe2"],
  [21, "\x99\xa1\xa7\xac\xb0\xb1\xb3\xd1\xd8\xd9\xe3\xe5\xe6"],
  [
    22,
    "\x81\x84\x85\x86\x88\x92\x9a\x9c\xa0\xa3\xa4\xa9\xaa\xad\xb2\xb5\xb9\xba\xbb\xbd" +
    "\xbe\xc4\xc6\xe4\xe8\xe9",
  ],
  [
    23,
    "\x01\x87\x89\x8a\x8b\x8c\x8d\x8f\x93\x95\x96\x97\x98\x9b\x9d\x9e\xa5\xa6\xa8\xae" +
    "\xaf\xb4\xb6\xb7\xbc\xbf\xc5\xe7\xef",
  ],
  [24, "\x09\x8e\x90\x91\x94\x9f\xab\xce\xd7\xe1\xec\xed"],
  [25, "\xc7\xcf\xea\xeb"],
  [26, "\xc0\xc1\xc8\xc9\xca\xcd\xd2\xd5\xda\xdb\xee\xf0\xf2\xf3\xff"],
  [27, "\xcb\xcc\xd3\xd4\xd6\xdd\xde\xdf\xf1\xf4\xf5\xf6\xf7\xf8\xfa\xfb\xfc\xfd\xfe"],
  [
    28,
    "\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f\x10\x11\x12\x13\x14\x15\x17\x18\x19" +
    "\x1a\x1b\x1c\x1d\x1e\x1f\x7f\xdc\xf9",
  ],
  [30, "\x0a\x0d\x16\u0100"],
];

/** Each symbol's code and its length in bits, from {@linkcode SYMBOLS_BY_CODE_LENGTH}. */
function canonicalCode(): { codes: number[]; lengths: number[] } {
  const codes: number[] = [];
  const lengths: number[] = [];
  let code = 0;
  let previous = SYMBOLS_BY_CODE_LENGTH[0][0];
  for (const [length, symbols] of SYMBOLS_BY_CODE_LENGTH) {
    code <<= length - previous;
    previous = length;
    for (let i = 0; i < symbols.length; i++) {
      codes[symbols.charCodeAt(i)] = code++;
      lengths[symbols.charCodeAt(i)] = length;
    }
  }
  return { codes, lengths };
}

const CODE = canonicalCode();

/** The Huffman code of each symbol 0-256 (256 is EOS), right-aligned (RFC 7541 Appendix B). */
export const HUFFMAN_CODES: readonly number[] = CODE.codes;

/** The length in bits of each symbol's Huffman code. */
export const HUFFMAN_LENGTHS: readonly number[] = CODE.lengths;
