// Writes functions/_generated/ offline with Convex's own code generation templates (the ones
// `npx convex codegen` uses), formatted with prettier as it does. `npx convex codegen` itself
// needs a deployment, which a machine without Convex's cloud cannot reach; the output is the same
// shape (the default, dynamic data model, typed from schema.ts). Run: npm run codegen.
import { readFileSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import * as prettier from "prettier";
import { apiCodegen } from "../node_modules/convex/src/cli/codegen_templates/api.ts";
import { compareModulePaths, header } from "../node_modules/convex/src/cli/codegen_templates/common.ts";
import { serverCodegen } from "../node_modules/convex/src/cli/codegen_templates/server.ts";

const templates = join(dirname(fileURLToPath(import.meta.url)), "..", "node_modules", "convex", "src", "cli", "codegen_templates");

/** The dynamic data model template of dataModel.ts, read from its source: the module itself
 * imports the CLI's context (and its dependencies, which the package does not ship). */
function dynamicDataModelDTS(): string {
  const source = readFileSync(join(templates, "dataModel.ts"), "utf8");
  const match = /const dynamicDataModelContent = `([\s\S]*?)`;\n/.exec(source);
  if (!match) throw new Error("dataModel.ts: the dynamic data model template moved");
  return new Function("header", "return `" + match[1] + "`;")(header) as string;
}

const functionsDir = join(dirname(fileURLToPath(import.meta.url)), "..", "functions");
const out = join(functionsDir, "_generated");

/** The entry points Convex bundles (its rules: .ts/.js, not _generated/, schema, dotfiles,
 * files with more than one dot such as auth.config.ts). */
function modules(dir: string): string[] {
  const found: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    const rel = relative(functionsDir, path);
    if (statSync(path).isDirectory()) {
      if (name !== "_generated") found.push(...modules(path));
    } else if (/\.(ts|js)$/.test(name) && !name.endsWith(".d.ts") && name !== "schema.ts"
      && !name.startsWith(".") && (name.match(/\./g) || []).length === 1) {
      found.push(rel);
    }
  }
  return found;
}

async function write(name: string, contents: string) {
  const formatted = await prettier.format(contents, { parser: "typescript", pluginSearchDirs: false } as prettier.Options);
  writeFileSync(join(out, name), formatted);
}

const paths = modules(functionsDir).sort(compareModulePaths);
const api = apiCodegen(paths, { useTypeScript: false });
const server = serverCodegen({ useTypeScript: false, envVars: undefined });
await write("api.js", api.JS!);
await write("api.d.ts", api.DTS!);
await write("server.js", server.JS!);
await write("server.d.ts", server.DTS!);
await write("dataModel.d.ts", dynamicDataModelDTS());
console.log(`codegen: ${paths.length} modules -> ${relative(process.cwd(), out)}`);
