// Validates SDL files with @akashnetwork/chain-sdk: its JSON schema (validateSDL) and its
// manifest generator (generateManifest, which also checks cross-references and resources).
// Prints one JSON line per file: {file, schemaErrors, manifestOk, manifestErrors, groups}.
import fs from "node:fs";
import yaml from "js-yaml";
import { validateSDL, generateManifest } from "@akashnetwork/chain-sdk";

const network = process.env.AKASH_NETWORK || "mainnet";
let failed = false;
for (const file of process.argv.slice(2)) {
  const sdl = yaml.load(fs.readFileSync(file, "utf8"));
  const schemaErrors = validateSDL(sdl, network) ?? [];
  const m = generateManifest(sdl, network);
  const out = {
    file,
    schemaErrors,
    manifestOk: m.ok === true,
    manifestErrors: m.ok ? [] : m.value,
    groups: m.ok ? m.value.groups.map((g) => ({ name: g.name, services: g.services.map((s) => s.name) })) : [],
  };
  failed ||= schemaErrors.length > 0 || !out.manifestOk;
  console.log(JSON.stringify(out));
}
process.exit(failed ? 1 : 0);
