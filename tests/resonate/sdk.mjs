// Resonate's own TypeScript SDK (@resonatehq/sdk from npm, pinned) against
// the sidecar, as a new user would point it at a Resonate server: its
// HttpNetwork and its Promises, unchanged. Driven by tests/it/resonate.rs,
// which passes SIDECAR_URL, TOKEN (an operator token) and ID (a fresh
// promise id), and checks the events afterwards. Prints one line per step;
// exits 1 at the first answer that is not what Resonate's server gives.
import assert from "node:assert/strict";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.env.NODE_PATH.split(":")[0];
const sdk = join(modules, "@resonatehq", "sdk", "dist", "src");
const { HttpNetwork } = await import(pathToFileURL(join(sdk, "index.js")));
// Resonate builds its `promises` this way from its network's send.
const { Promises } = await import(pathToFileURL(join(sdk, "promises.js")));

const url = process.env.SIDECAR_URL;
const id = process.env.ID;
const network = new HttpNetwork({ url, token: process.env.TOKEN, timeout: 5000 });
const promises = new Promises(network.send);
const step = (name, value) => console.log(`${name}: ${JSON.stringify(value)}`);
const head = () => ({ corrId: crypto.randomUUID(), version: "2026-04-01" });

const timeoutAt = Date.now() + 600_000;
const param = { headers: { source: "sdk" }, data: Buffer.from('{"n":1}').toString("base64") };
const created = await promises.create(id, timeoutAt, { ...param, tags: { suite: "resonate-sdk" } });
step("create", created);
assert.equal(created.id, id);
assert.equal(created.state, "pending");
assert.equal(created.timeoutAt, timeoutAt);
assert.deepEqual(created.param, param);
assert.equal(created.settledAt, undefined);

const again = await promises.create(id, timeoutAt, { ...param, tags: { suite: "resonate-sdk" } });
step("create again", again);
assert.deepEqual(again, created);

const got = await promises.get(id);
step("get", got);
assert.deepEqual(got, created);

const found = await network.send({
  kind: "promise.search",
  head: head(),
  data: { state: "pending", tags: { suite: "resonate-sdk" }, limit: 1000 },
});
step("search", found.head);
assert.equal(found.head.status, 200);
assert.ok(found.data.promises.some((p) => p.id === id), "the search finds it");

const value = { data: Buffer.from('"done"').toString("base64") };
const settled = await promises.resolve(id, value);
step("settle", settled);
assert.equal(settled.state, "resolved");
assert.equal(settled.value.data, value.data);
assert.equal(typeof settled.settledAt, "number");

const settledAgain = await promises.reject(id, { data: "" });
step("settle again", settledAgain);
assert.deepEqual(settledAgain, settled, "a settled promise is answered as it is");

await assert.rejects(promises.get(`${id}-missing`), (e) => {
  step("get missing", e.message ?? String(e));
  return true;
});

const task = await network.send({
  kind: "task.create",
  head: head(),
  data: { pid: "p", ttl: 1000, action: { kind: "promise.create", head: head(), data: { id: `${id}-task`, timeoutAt, param: {}, tags: {} } } },
});
step("task.create", task);
assert.equal(task.head.status, 501);
assert.equal(typeof task.data, "string");

const stranger = new HttpNetwork({ url, token: "not-a-token", timeout: 5000 });
await assert.rejects(new Promises(stranger.send).get(id), (e) => {
  step("wrong token", e.message ?? String(e));
  return true;
});
console.log("ok");
