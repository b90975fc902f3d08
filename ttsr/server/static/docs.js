// Offline API reference: renders this server's /openapi.json (no CDN, no third-party viewer).
"use strict";

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function resolve(spec, schema) {
  if (schema && schema.$ref) {
    return resolve(spec, schema.$ref.split("/").slice(1).reduce((node, key) => node[key], spec));
  }
  return schema || {};
}

function typeName(spec, schema) {
  schema = resolve(spec, schema);
  if (schema.anyOf) return schema.anyOf.map((s) => typeName(spec, s)).join(" | ");
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.type === "array") return `array of ${typeName(spec, schema.items)}`;
  if (schema.format === "binary" || schema.contentMediaType) return "file";
  return schema.type || schema.title || "object";
}

function fieldTable(spec, rows) {
  const table = element("table", undefined, "fields");
  const head = table.createTHead().insertRow();
  for (const title of ["name", "in", "type", "description"]) head.append(element("th", title));
  const body = table.createTBody();
  for (const row of rows) {
    const line = body.insertRow();
    line.append(
      element("td", row.name + (row.required ? " *" : ""), "name"),
      element("td", row.where),
      element("td", typeName(spec, row.schema)),
      element("td", row.description || resolve(spec, row.schema).description || ""),
    );
  }
  return table;
}

function requestFields(spec, operation) {
  const rows = (operation.parameters || []).map((p) => ({
    name: p.name, where: p.in, required: p.required, schema: p.schema, description: p.description,
  }));
  const content = (operation.requestBody && operation.requestBody.content) || {};
  for (const [mediaType, body] of Object.entries(content)) {
    const schema = resolve(spec, body.schema);
    for (const [name, property] of Object.entries(schema.properties || {})) {
      rows.push({
        name, where: mediaType, required: (schema.required || []).includes(name),
        schema: property, description: resolve(spec, property).description,
      });
    }
  }
  return rows;
}

function responseList(spec, operation) {
  const list = element("ul", undefined, "responses");
  for (const [status, response] of Object.entries(operation.responses || {})) {
    const item = element("li");
    item.append(element("code", status), ` ${response.description || ""}`);
    for (const [mediaType, body] of Object.entries(response.content || {})) {
      const schema = resolve(spec, body.schema);
      const fields = Object.keys(schema.properties || {});
      item.append(element("div", `${mediaType}${fields.length ? ": " + fields.join(", ") : ""}`, "muted"));
    }
    list.append(item);
  }
  return list;
}

function render(spec) {
  const main = document.getElementById("api-docs");
  main.replaceChildren();
  document.getElementById("api-version").textContent = `version ${spec.info.version}`;
  if (spec.info.summary) main.append(element("p", spec.info.summary));
  if (spec.info.description) main.append(element("p", spec.info.description));
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, operation] of Object.entries(methods)) {
      const section = element("section", undefined, "operation");
      const title = element("h2");
      title.append(element("span", method.toUpperCase(), `method ${method}`), ` ${path}`);
      section.append(title);
      if (operation.summary) section.append(element("p", operation.summary, "summary"));
      if (operation.description) section.append(element("p", operation.description));
      const rows = requestFields(spec, operation);
      if (rows.length) section.append(element("h3", "Request"), fieldTable(spec, rows));
      section.append(element("h3", "Responses"), responseList(spec, operation));
      main.append(section);
    }
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  try {
    const response = await fetch("/openapi.json");
    render(await response.json());
  } catch (error) {
    document.getElementById("api-docs").textContent = `Could not read /openapi.json: ${error}`;
  }
});
