// Parses and validates an AsyncAPI document with the AsyncAPI Initiative's
// own parser (@asyncapi/parser, installed by `make docs-test` under
// target/node). Prints every diagnostic; exits 1 on any error.
import { createRequire } from 'node:module';
import fs from 'node:fs';

const modules = process.env.ASYNCAPI_NODE_MODULES;
const require = createRequire(modules.endsWith('/') ? modules : modules + '/');
const { Parser } = require('@asyncapi/parser');

const file = process.argv[2];
const { document, diagnostics } = await new Parser().parse(fs.readFileSync(file, 'utf8'));
for (const d of diagnostics) {
  console.log(`${['error', 'warning', 'info', 'hint'][d.severity]} ${d.code}: ${d.message} at ${JSON.stringify(d.path)}`);
}
const errors = diagnostics.filter((d) => d.severity === 0);
if (!document || errors.length > 0) {
  console.log(`${file}: ${errors.length} errors`);
  process.exit(1);
}
console.log(`${file}: valid AsyncAPI ${document.version()}`);
