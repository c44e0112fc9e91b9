/**
 * Writes the settings reference in `docs/configuration.md` from the settings table in
 * `src/config.ts` (`SETTINGS`), so that the page, `--help` and the parser can never disagree.
 *
 * ```sh
 * deno task docs            # rewrite the generated part of docs/configuration.md
 * deno task docs --check    # exit 1 when the page is stale (what tests/config_test.ts checks)
 * ```
 *
 * Only the part between the two markers is generated; the prose around it is written by hand.
 * The output goes through `deno fmt`, so the page is the same bytes `deno fmt` would leave; the
 * prose around it is formatted as well.
 *
 * @module
 */

import { type Setting, SETTINGS } from "../src/config.ts";

/** The page the reference lives in, relative to the repository root. */
export const CONFIG_DOC_PATH = "docs/configuration.md";
/** Marks the start of the generated part. */
export const BEGIN_MARKER =
  "<!-- BEGIN GENERATED: settings from src/config.ts; run `deno task docs` -->";
/** Marks its end. */
export const END_MARKER = "<!-- END GENERATED -->";

/**
 * Where each group's behaviour is explained at length. A group missing here (a new one)
 * simply gets no link.
 */
const GROUP_DETAILS: Readonly<Record<string, string>> = {
  Serving: "[Limits and their defaults](security.md#limits-and-their-defaults)",
  Clients:
    "[Threat model](security.md#threat-model) and [Limits](security.md#limits-and-their-defaults)",
  Upstreams: "[Upstreams and failover](upstreams.md)",
  Routing: "[Per-zone routing and special-use names](zones.md)",
  Cache: "[The answer cache](cache.md)",
  Logging: "[Logs](operations.md#logs)",
  Shutdown: "[Signals and graceful shutdown](operations.md#signals-and-graceful-shutdown)",
};

/** `--flag ARG`, or `(environment only)`, as `--help` writes it. */
export function flagText(setting: Setting): string {
  if (setting.flag === "") return "(environment only)";
  return `--${setting.flag}${setting.arg ? " " + setting.arg : ""}`;
}

/** Backquotes for inline code, with enough backquotes for code that holds one. */
function code(text: string): string {
  return text.includes("`") ? `\`\` ${text} \`\`` : `\`${text}\``;
}

/** A default as code when it is one value (`1232`), as words when it is a phrase. */
function value(text: string): string {
  return /^[^ ]+$/.test(text) || text.includes(",") ? code(text) : text;
}

/** Escapes the pipes of a table cell. */
function cell(text: string): string {
  return text.replaceAll("|", "\\|");
}

/** The heading of one setting: its flag, or its variable for an environment-only one. */
function heading(setting: Setting): string {
  return setting.flag === "" ? `${code(setting.env)} (environment only)` : code(flagText(setting));
}

/**
 * The generated markdown (before `deno fmt`): an index table, then each group's settings
 * with flag, variable, default, accepted values and description.
 */
export function renderSettings(settings: readonly Setting[] = SETTINGS): string {
  const out: string[] = [];
  out.push(
    "| flag | environment variable | default |",
    "| ---- | -------------------- | ------- |",
  );
  for (const setting of settings) {
    const fallback = setting.defaultText.length > 40 ? "see below" : value(setting.defaultText);
    const flag = setting.flag === "" ? flagText(setting) : code(flagText(setting));
    out.push(`| ${cell(flag)} | ${code(setting.env)} | ${cell(fallback)} |`);
  }
  let group = "";
  for (const setting of settings) {
    if (setting.group !== group) {
      group = setting.group;
      out.push("", `### ${group}`);
      const details = GROUP_DETAILS[group];
      if (details) out.push("", `How these behave: ${details}.`);
    }
    out.push("", `#### ${heading(setting)}`, "");
    out.push(setting.help.replace(/^./, (first) => first.toUpperCase()) + ".");
    out.push("");
    const alias = setting.alias ? ` (or ${code(setting.alias)})` : "";
    out.push(`- Variable: ${code(setting.env)}${alias}`);
    out.push(`- Default: ${value(setting.defaultText)}`);
    if (setting.range) out.push(`- Accepts: ${setting.range}`);
    if (setting.kind === "boolean") {
      out.push(`- A switch: ${code(`--${setting.flag}`)}, ${code(`--${setting.flag}=false`)}.`);
    }
  }
  return out.join("\n") + "\n";
}

/** Runs `deno fmt` over markdown text and returns what it prints. */
export async function formatMarkdown(text: string): Promise<string> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["fmt", "--ext", "md", "-"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(new TextEncoder().encode(text));
  await writer.close();
  const output = await child.output();
  if (!output.success) {
    throw new Error(`deno fmt failed: ${new TextDecoder().decode(output.stderr)}`);
  }
  return new TextDecoder().decode(output.stdout);
}

/** The part of `page` between the markers (exclusive), or `null` without both markers. */
export function generatedPart(page: string): string | null {
  const start = page.indexOf(BEGIN_MARKER);
  const end = page.indexOf(END_MARKER);
  if (start < 0 || end < start) return null;
  return page.slice(start + BEGIN_MARKER.length, end).replace(/^\n+/, "").replace(/\n+$/, "\n");
}

/** `page` with its generated part replaced by `part`. */
export function replaceGeneratedPart(page: string, part: string): string {
  const start = page.indexOf(BEGIN_MARKER);
  const end = page.indexOf(END_MARKER);
  if (start < 0 || end < start) {
    throw new Error(`${CONFIG_DOC_PATH} lacks the markers ${BEGIN_MARKER} ... ${END_MARKER}`);
  }
  return `${page.slice(0, start + BEGIN_MARKER.length)}\n\n${part.trimEnd()}\n\n${page.slice(end)}`;
}

/** The generated part as it must stand in the page: rendered and formatted. */
export async function expectedGeneratedPart(): Promise<string> {
  return (await formatMarkdown(renderSettings())).replace(/\n+$/, "\n");
}

if (import.meta.main) {
  const path = new URL(`../${CONFIG_DOC_PATH}`, import.meta.url);
  const page = await Deno.readTextFile(path);
  const expected = await expectedGeneratedPart();
  if (Deno.args.includes("--check")) {
    if (generatedPart(page) !== expected) {
      console.error(`${CONFIG_DOC_PATH} is stale: run \`deno task docs\``);
      Deno.exit(1);
    }
    console.log(`${CONFIG_DOC_PATH} is up to date`);
  } else {
    await Deno.writeTextFile(path, replaceGeneratedPart(page, expected));
    // The hand-written prose around the generated part is formatted too, as `deno task check`
    // expects.
    const fmt = await new Deno.Command(Deno.execPath(), {
      args: ["fmt", "-q", CONFIG_DOC_PATH],
      cwd: new URL("..", import.meta.url),
    }).output();
    if (!fmt.success) Deno.exit(1);
    console.log(`wrote ${CONFIG_DOC_PATH}`);
  }
}
