// Validates custom resources against their CRD schemas: node crd_validate.mjs NODE_MODULES OBJECTS.json
// prints one JSON line {"errors": [[kind, name, message], ...]}. The validators are the ones kubernetes-models
// generates from the prometheus-operator and KEDA CRDs (installed into .tools by `make tools`).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, file] = process.argv.slice(2);
const load = (path) => import(pathToFileURL(join(modules, path)).href);
const monitoring = await load("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js");
const keda = await load("@kubernetes-models/keda/keda.sh/v1alpha1/index.js");
const models = {
  "monitoring.coreos.com/v1": monitoring,
  "keda.sh/v1alpha1": keda,
};
const errors = [];
for (const object of JSON.parse(readFileSync(file, "utf8"))) {
  const group = models[object.apiVersion];
  const Model = group && group[object.kind];
  const name = object.metadata?.name ?? "";
  if (!Model) {
    errors.push([object.kind, name, `no CRD schema for ${object.apiVersion} ${object.kind}`]);
    continue;
  }
  try {
    new Model(object).validate();
  } catch (error) {
    errors.push([object.kind, name, error.message]);
  }
}
console.log(JSON.stringify({ errors }));
