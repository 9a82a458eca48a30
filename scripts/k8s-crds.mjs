// Validates custom resources (KEDA, Prometheus Operator) against the
// schemas their projects publish, as compiled into the @kubernetes-models
// packages from npm. Reads a JSON array of objects on stdin; prints one
// line per object; exits 1 if any is invalid or of a kind it has no schema
// for. Run by scripts/k8s-check.py, with NODE_PATH at those packages.
import { existsSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const packages = {
  "keda.sh": "@kubernetes-models/keda",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};
const modules = process.env.NODE_PATH.split(":")[0];

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = 0;
for (const obj of JSON.parse(input)) {
  const name = `${obj.kind}/${obj.metadata?.name} (${obj.apiVersion})`;
  const [group, version] = obj.apiVersion.split("/");
  const pkg = packages[group];
  if (!pkg) {
    console.log(`ERROR ${name}: no published schema for group ${group}`);
    failed++;
    continue;
  }
  const file = join(modules, pkg, group, version, `${obj.kind}.js`);
  if (!existsSync(file)) {
    console.log(`ERROR ${name}: ${pkg} has no such kind (${file})`);
    failed++;
    continue;
  }
  const Model = (await import(pathToFileURL(file)))[obj.kind];
  try {
    new Model(obj).validate();
    console.log(`ok    ${name}`);
  } catch (e) {
    console.log(`ERROR ${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
