/**
 * Multi-document YAML (or JSON) manifests, parsed with the position of the first syntax error.
 * Apart from apply.ts so that commands that only read files (convert, validate) do not load the
 * Kubernetes client.
 */
import { parseAllDocuments } from "yaml";
import type { KubeObject } from "./client.ts";

/** A YAML text that does not parse, with where. */
export class ManifestError extends Error {
  override readonly name = "ManifestError";
  readonly source: string;
  readonly line: number | undefined;
  readonly column: number | undefined;
  /** The offending lines with a caret under the position, as the YAML parser shows them. */
  readonly snippet: string;
  constructor(
    source: string,
    message: string,
    where: { line?: number; column?: number; snippet?: string } = {},
  ) {
    const at =
      where.line === undefined
        ? ""
        : `line ${where.line}${where.column === undefined ? "" : `, column ${where.column}`}: `;
    super(`Cannot parse ${source}: ${at}${message}`);
    this.source = source;
    this.line = where.line;
    this.column = where.column;
    this.snippet = where.snippet ?? "";
  }
}

/**
 * The objects of a multi-document YAML (or JSON) text. Throws ManifestError at the first syntax
 * error, naming its line and column, and for a document that is not an object.
 */
export function parseManifests(text: string, source = "(input)"): KubeObject[] {
  const objects: KubeObject[] = [];
  const docs = parseAllDocuments(text);
  if (!Array.isArray(docs)) return objects;
  docs.forEach((doc, i) => {
    const error = doc.errors[0];
    if (error !== undefined) {
      // The parser's message is "<what> at line L, column C:\n\n<snippet>".
      const [what, snippet] = error.message.split(/ at line \d+, column \d+:\n\n/);
      const pos = error.linePos?.[0];
      throw new ManifestError(source, what ?? error.message, {
        ...(pos === undefined ? {} : { line: pos.line, column: pos.col }),
        ...(snippet === undefined ? {} : { snippet: snippet.trimEnd() }),
      });
    }
    const value: unknown = doc.toJS();
    if (value === null || value === undefined) return;
    if (typeof value !== "object" || Array.isArray(value)) {
      const line =
        doc.contents?.range?.[0] === undefined ? undefined : lineOf(text, doc.contents.range[0]);
      throw new ManifestError(
        source,
        `document ${i + 1} is not an object: write one Kubernetes object per YAML document`,
        line === undefined ? {} : { line },
      );
    }
    objects.push(value as KubeObject);
  });
  return objects;
}

function lineOf(text: string, offset: number): number {
  let line = 1;
  for (let i = 0; i < offset && i < text.length; i++) if (text.charCodeAt(i) === 10) line++;
  return line;
}
