/** The version of dotproxy, printed by `--version` and exported as build info. */
export const VERSION = "0.1.0";
