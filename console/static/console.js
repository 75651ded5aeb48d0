// fedbell operator console: MQTT over WebSockets straight to the broker.
//
// Everything shown comes from the site's topics (fedbell/wire/topics.py): retained
// ones give the state on connect, live ones keep it current. Each payload is
// read against its producer's schema (messages.js); unknown fields are ignored
// and a payload that cannot be read is
// shown as an error on its own item, never anywhere else: every message goes
// through `handle`, which catches whatever a handler throws. Data is only
// ever written with textContent, so a payload cannot inject markup.
"use strict";

const params = new URLSearchParams(location.search);
const site = params.get("site") || "";
const root = params.get("root") || "fedbell";
const base = `${root}/${site}`;
const TOPICS = {
  control: `${base}/control`,
  round: `${base}/round`,
  metrics: `${base}/metrics`,
  aggregator: `${base}/aggregator/status`,
  reply: `${base}/aggregator/reply`,
  statuses: `${base}/status/+`,
  events: ["visitor", "ring", "snapshot"].map((leaf) => `doorbell/+/${leaf}`),
};
const VISITS_SHOWN = 5;
const ROUNDS_LISTED = 10; // the table's rows; the charts plot every round the page holds
const ROUNDS_KEPT = 500;
// The page logs in only to the broker that served it: no address from a link (a
// `?broker=` once let a link send the operator's password to another host).
const BROKER_URL = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/mqtt`;

const state = {
  doorbells: new Map(), // id -> {status, error, update}
  rounds: new Map(), // round id -> metrics
  rejectedTotal: new Map(), // reason -> count over the rounds seen
  round: null,
  visits: new Map(), // doorbell id -> [{kind, data, error, at}]
};
let client = null;

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// -- reading payloads: each against the schema of the model that builds it ------------
//
// MESSAGE_SCHEMAS (messages.js) is generated from the producers' own models
// (`python -m console.schema`), so what a doorbell or the aggregator sends is what
// the page expects. Fields the page does not know are ignored (a newer producer
// may add some); a known field of the wrong type, or a required one missing,
// makes the payload malformed.

class Malformed extends Error {}

function parseObject(payload) {
  let data;
  try {
    data = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(payload));
  } catch (err) {
    throw new Malformed(`not JSON (${err.message})`);
  }
  if (data === null || typeof data !== "object" || Array.isArray(data)) {
    throw new Malformed("not a JSON object");
  }
  return data;
}

function resolve(schema, root) {
  if (!schema.$ref) return schema;
  const target = (root.$defs || {})[schema.$ref.replace("#/$defs/", "")];
  if (!target) throw new Error(`messages.js: unresolved ${schema.$ref}`);
  return target;
}

const TYPE_NAMES = {
  integer: "an integer", number: "a number", string: "a string", boolean: "true or false",
  array: "a list", object: "an object", null: "null",
};

function describe(schema, root) {
  const s = resolve(schema, root);
  if (s.anyOf) return s.anyOf.map((option) => describe(option, root)).join(" or ");
  if (s.enum) return `one of ${s.enum.join(", ")}`;
  if (s.format === "date-time") return "an ISO-8601 time";
  return TYPE_NAMES[s.type] || "readable";
}

function inBounds(value, s) {
  return !(value < s.minimum || value > s.maximum ||
    value <= s.exclusiveMinimum || value >= s.exclusiveMaximum);
}

function fits(value, schema, root) {
  const s = resolve(schema, root);
  if (s.anyOf) return s.anyOf.some((option) => fits(value, option, root));
  if (s.enum && !s.enum.includes(value)) return false;
  switch (s.type) {
    case "null": return value === null;
    case "boolean": return typeof value === "boolean";
    case "integer": return Number.isInteger(value) && inBounds(value, s);
    case "number": return Number.isFinite(value) && inBounds(value, s);
    case "string":
      return typeof value === "string" &&
        (!s.pattern || new RegExp(s.pattern).test(value)) &&
        (s.format !== "date-time" || !Number.isNaN(Date.parse(value)));
    case "array":
      return Array.isArray(value) && value.length <= (s.maxItems ?? Infinity) &&
        (!s.items || value.every((v) => fits(v, s.items, root)));
    case "object": {
      if (value === null || typeof value !== "object" || Array.isArray(value)) return false;
      const properties = s.properties || {};
      if ((s.required || []).some((key) => value[key] === undefined)) return false;
      return Object.entries(value).every(([key, v]) => (key in properties ?
        fits(v, properties[key], root) :
        typeof s.additionalProperties !== "object" || fits(v, s.additionalProperties, root)));
    }
    default: return true; // no type: anything
  }
}

// The message's known fields, checked, with the model's defaults for absent ones.
function read(kind, data) {
  const root = MESSAGE_SCHEMAS[kind];
  const required = new Set(root.required || []);
  const message = {};
  for (const [key, schema] of Object.entries(root.properties)) {
    const value = data[key];
    if (value === undefined) {
      if (required.has(key)) throw new Malformed(`no "${key}"`);
      message[key] = schema.default ?? null;
    } else if (!fits(value, schema, root)) {
      throw new Malformed(`"${key}" is not ${describe(schema, root)}`);
    } else {
      message[key] = value;
    }
  }
  return message;
}

// A payload's message: JSON, an object, and its known fields checked (`Malformed` if not).
const readPayload = (kind, payload) => read(kind, parseObject(payload));

const percent = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)} %`);

// kB = 1000 B, as the demo and the benchmarks print them.
function human(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  if (bytes < 1000) return `${bytes} B`;
  if (bytes < 1000 * 1000) return `${(bytes / 1000).toFixed(1)} kB`;
  return `${(bytes / 1000 / 1000).toFixed(2)} MB`;
}

// Times are Unix seconds (the aggregator's) or ISO-8601 strings (the doorbells').
const clock = (time) =>
  new Date(typeof time === "string" ? time : time * 1000).toLocaleTimeString();

function deviceOf(topic, prefix) {
  const rest = topic.slice(prefix.length);
  return /^[A-Za-z0-9_-]{1,64}$/.test(rest) ? rest : null;
}

// -- handlers, one per topic --------------------------------------------------------

// A doorbell's row: its status, why its last status was refused, its last update's reply.
function doorbell(device) {
  const entry = state.doorbells.get(device) || { status: null, error: null, update: null };
  state.doorbells.set(device, entry);
  return entry;
}

function onStatus(device, payload) {
  const entry = doorbell(device);
  if (payload.length === 0) {
    state.doorbells.delete(device); // retained status cleared: the doorbell was removed
  } else {
    try {
      const status = readPayload("status", payload);
      // A last will is written at connect time: keep the model version seen last.
      const last = entry.status;
      status.versionIsOld = status.model_version === null && last !== null &&
        last.model_version !== null;
      if (status.versionIsOld) status.model_version = last.model_version;
      entry.status = status;
      entry.error = null;
    } catch (err) {
      entry.error = `malformed status: ${err.message}`;
    }
  }
  renderDoorbells();
}

function onRound(payload) {
  try {
    state.round = { ...readPayload("round", payload), error: null };
  } catch (err) {
    state.round = { error: `malformed round message: ${err.message}` };
  }
  renderRound();
}

// Add (sign 1) or take back (sign -1) a round's rejections, by reason, to the totals.
function addRejected(rejected, sign) {
  for (const [reason, count] of Object.entries(rejected)) {
    state.rejectedTotal.set(reason, (state.rejectedTotal.get(reason) || 0) + sign * count);
  }
}

function onMetrics(payload) {
  const error = $("metrics-error");
  try {
    const metrics = readPayload("metrics", payload);
    // A round is reported twice in step-by-step mode (aggregated, then published):
    // its rejections count once, from the last report.
    const previous = state.rounds.get(metrics.round);
    if (previous) addRejected(previous.rejected, -1);
    addRejected(metrics.rejected, 1);
    state.rounds.set(metrics.round, metrics);
    // The lineage's earlier rounds, retained with the metrics: the charts start filled.
    for (const earlier of metrics.history) {
      if (!state.rounds.has(earlier.round)) {
        state.rounds.set(earlier.round, { ...earlier, seconds: null, rejected: {} });
      }
    }
    for (const round of [...state.rounds.keys()].sort((a, b) => a - b).slice(0, -ROUNDS_KEPT)) {
      state.rounds.delete(round);
    }
    error.hidden = true;
  } catch (err) {
    error.textContent = `malformed metrics: ${err.message}`;
    error.hidden = false;
  }
  renderModel();
}

function onAggregator(payload) {
  const badge = $("aggregator");
  try {
    const status = readPayload("status", payload);
    const online = status.state === "online";
    const version = status.model_version;
    badge.textContent = `aggregator: ${online ? "online" : "offline"}` +
      (version === null ? "" : `, model v${version}`);
    badge.className = `badge ${online ? "online" : "offline"}`;
  } catch (err) {
    badge.textContent = `aggregator: malformed status (${err.message})`;
    badge.className = "badge error";
  }
}

function onReply(payload) {
  try {
    const { about, ok, time, cmd, device, size, round, reason, detail } =
      readPayload("reply", payload);
    if (about === "update" || about === "secagg") {  // secagg: a secure round's update
      if (device === null || deviceOf(device, "") === null) return;
      doorbell(device).update = { ok, size, round, reason };
      renderDoorbells();
      return;
    }
    const reply = $("reply");
    reply.replaceChildren(
      el("span", ok ? "done" : "refused", ok ? "ok" : "refused"),
      el("span", ` ${cmd || "(unreadable command)"}${reason ? `: ${reason}` : ""}` +
        (detail ? ` (${detail})` : "")),
      el("span", time === null ? "" : ` at ${clock(time)}`, "muted"),
    );
    reply.className = "item";
  } catch (err) {
    const reply = $("reply");
    reply.textContent = `malformed reply: ${err.message}`;
    reply.className = "item error";
  }
}

function onEvent(device, kind, payload) {
  const list = state.visits.get(device) || [];
  state.visits.set(device, list);
  const item = { kind, at: Date.now() / 1000, data: null, error: null, image: null };
  if (kind === "snapshot") {
    // Only a house that opted in publishes snapshots: show what it sent, as an image.
    item.image = URL.createObjectURL(new Blob([payload], { type: "image/jpeg" }));
  } else {
    try {
      if (!(kind in MESSAGE_SCHEMAS)) return; // a doorbell leaf this page does not show
      item.data = readPayload(kind, payload);
    } catch (err) {
      item.error = `malformed ${kind} event: ${err.message}`;
    }
  }
  list.unshift(item);
  for (const old of list.splice(VISITS_SHOWN)) if (old.image) URL.revokeObjectURL(old.image);
  renderVisits();
}

function handle(topic, payload) {
  try {
    if (topic === TOPICS.round) onRound(payload);
    else if (topic === TOPICS.metrics) onMetrics(payload);
    else if (topic === TOPICS.aggregator) onAggregator(payload);
    else if (topic === TOPICS.reply) onReply(payload);
    else if (topic.startsWith(`${base}/status/`)) {
      const device = deviceOf(topic, `${base}/status/`);
      if (device !== null) onStatus(device, payload);
    } else if (topic.startsWith("doorbell/")) {
      const [, device, kind] = topic.split("/");
      if (deviceOf(device, "") !== null && payload.length > 0) onEvent(device, kind, payload);
    }
  } catch (err) {
    // A bug in a renderer must not stop the next message from being shown.
    console.error("console: error handling", topic, err);
  }
}

// -- rendering --------------------------------------------------------------------

// Each cell carries its column's heading: on a phone a row is shown as labelled lines.
function labelCells(table) {
  const headings = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
  for (const row of table.querySelectorAll("tbody tr")) {
    [...row.cells].forEach((cell, i) => {
      if (cell.colSpan === 1 && headings[i]) cell.dataset.label = headings[i];
    });
  }
}

function renderDoorbells() {
  const body = $("doorbells").querySelector("tbody");
  body.replaceChildren();
  const ids = [...state.doorbells.keys()].sort();
  $("no-doorbells").hidden = ids.length > 0;
  for (const id of ids) {
    const { status, error, update } = state.doorbells.get(id);
    const row = el("tr");
    row.dataset.device = id;
    row.append(el("td", id));
    if (error) {
      row.className = "error";
      const cell = el("td", error, "state error");
      cell.colSpan = 5;
      row.append(cell);
    } else if (status === null) {
      const cell = el("td", "no status yet", "state muted");
      cell.colSpan = 5;
      row.append(cell);
    } else {
      const online = status.state === "online";
      row.append(
        el("td", status.state, `state ${online ? "online" : "offline"}`),
        el("td", status.model_version === null ? "–" :
          `v${status.model_version}${status.versionIsOld ? " (last seen)" : ""}`, "model"),
        el("td", status.gallery_size ?? "–"),
        el("td", status.last_round ?? "–"),
        el("td", status.detail || "–", "detail"),
      );
    }
    let text = "–";
    if (update) {
      text = `${human(update.size)} round ${update.round ?? "?"}: ` +
        (update.ok ? "accepted" : `rejected (${update.reason || "?"})`);
    }
    row.append(el("td", text, `update ${update ? (update.ok ? "ok" : "refused") : ""}`));
    body.append(row);
  }
  labelCells($("doorbells"));
}

function renderRound() {
  const body = $("round-body");
  const round = state.round;
  if (round === null) return;
  if (round.error) {
    body.textContent = round.error;
    body.className = "item error";
    return;
  }
  body.className = "item";
  const left = round.deadline === null ? null : Math.round(round.deadline - Date.now() / 1000);
  // A closed or abandoned round has no deadline left to show.
  const open = round.phase !== "closed" && round.phase !== "abandoned";
  body.replaceChildren(
    el("span", "round "),
    el("strong", round.round, "round-id"),
    el("span", " phase "),
    el("strong", round.phase, "phase"),
    el("span", `, base version ${round.base_version ?? "?"}, codec ${round.codec ?? "?"}`),
    el("br"),
    el("span", `doorbells: ${round.selected.join(", ") || "none"}`),
  );
  if (open) {
    body.append(el("br"), el("span", round.deadline === null ? "no deadline" :
      `deadline ${clock(round.deadline)} ` +
      `(${left >= 0 ? `in ${left} s` : `passed ${-left} s ago`})`, "deadline"));
  }
}

function renderModel() {
  const rounds = [...state.rounds.values()].sort((a, b) => a.round - b.round);
  const last = rounds[rounds.length - 1];
  if (last) {
    $("version").textContent = last.version ? `v${last.version}` : "none";
    $("accuracy").textContent = percent(last.accuracy);
    $("metrics-round").textContent = last.round;
    $("outcome").textContent = last.outcome ?? "?";
    $("outcome").className = last.outcome ?? "";
  }
  const body = $("rounds").querySelector("tbody");
  body.replaceChildren();
  $("rounds-shown").textContent = rounds.length > ROUNDS_LISTED ?
    `the last ${ROUNDS_LISTED} of ${rounds.length} rounds` : "";
  for (const m of rounds.slice(-ROUNDS_LISTED).reverse()) {
    const row = el("tr");
    row.append(
      el("td", m.round), el("td", m.outcome ?? "?", m.outcome ?? ""),
      el("td", m.version ? `v${m.version}` : "–"), el("td", percent(m.accuracy)),
      el("td", m.participants ?? "–"), el("td", human(m.bytes_up)),
      el("td", human(m.bytes_down)), el("td", m.seconds ?? "–"),
    );
    body.append(row);
  }
  labelCells($("rounds"));
  chart($("accuracy-chart"), rounds, [["accuracy", "#1565c0", (v) => 100 * v]], "accuracy %", 100);
  chart($("bytes-chart"), rounds, [
    ["bytes_up", "#2e7d32", (v) => v / 1000],
    ["bytes_down", "#ef6c00", (v) => v / 1000],
  ], "kB up (green) / down (orange)", null);
  chart($("participants-chart"), rounds, [["participants", "#6a1b9a", (v) => v]],
    "doorbells whose update counted", null);
  renderRejections(last);
}

function chart(svg, rounds, series, title, fixedMax) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 320, H = 150, L = 34, B = 18, T = 14, R = 8;
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  svg.replaceChildren(node("text", { x: L, y: 10 }, title));
  const points = series.map(([key, , scale]) =>
    rounds.filter((m) => typeof m[key] === "number").map((m) => [m.round, scale(m[key])]));
  const all = points.flat();
  if (all.length === 0) return;
  const xMin = Math.min(...all.map((p) => p[0])), xMax = Math.max(...all.map((p) => p[0]));
  const yMax = fixedMax ?? Math.max(1, ...all.map((p) => p[1])) * 1.1;
  const x = (r) => L + (xMax === xMin ? (W - L - R) / 2 : ((r - xMin) / (xMax - xMin)) * (W - L - R));
  const y = (v) => H - B - (v / yMax) * (H - B - T);
  svg.append(
    node("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }),
    node("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }),
    node("text", { x: 2, y: T + 4 }, yMax.toFixed(0)),
    node("text", { x: 2, y: H - B }, "0"),
    node("text", { x: L, y: H - 4 }, `round ${xMin}`),
  );
  if (xMax !== xMin) svg.append(node("text", { x: W - R - 40, y: H - 4 }, `round ${xMax}`));
  series.forEach(([, color], i) => {
    const pts = points[i];
    if (pts.length > 1) {
      svg.append(node("polyline", {
        points: pts.map(([r, v]) => `${x(r)},${y(v)}`).join(" "),
        fill: "none", stroke: color, "stroke-width": 2,
      }));
    }
    for (const [r, v] of pts) svg.append(node("circle", { cx: x(r), cy: y(v), r: 2.5, fill: color }));
  });
}

function renderRejections(last) {
  const body = $("rejections").querySelector("tbody");
  body.replaceChildren();
  const reasons = [...state.rejectedTotal.entries()].filter(([, n]) => n > 0).map(([r]) => r);
  $("no-rejections").hidden = reasons.length > 0;
  for (const reason of reasons.sort()) {
    const row = el("tr");
    row.append(
      el("td", reason),
      el("td", (last && last.rejected[reason]) || 0),
      el("td", state.rejectedTotal.get(reason)),
    );
    body.append(row);
  }
  labelCells($("rejections"));
}

function renderVisits() {
  const box = $("visitors");
  box.replaceChildren();
  for (const device of [...state.visits.keys()].sort()) {
    const section = el("div");
    section.dataset.device = device;
    section.append(el("h3", device));
    const list = el("ul");
    for (const item of state.visits.get(device)) {
      if (item.error) {
        list.append(el("li", item.error, "error"));
      } else if (item.image) {
        const li = el("li", `snapshot at ${clock(item.at)}`);
        const img = el("img");
        img.src = item.image;
        img.alt = `snapshot from ${device}`;
        li.append(img);
        list.append(li);
      } else {
        const d = item.data;
        const li = el("li", null, item.kind === "ring" ? "ring" : "visit");
        li.append(el("span", clock(d.time), "time"), el("span", " "));
        if (item.kind === "ring") {
          li.append(el("span", `ring (${d.source}${d.person ? `, ${d.person}` : ""})`, "person"));
        } else {
          li.append(el("span", d.person, "person"), el("span", ", confidence "),
            el("span", d.confidence.toFixed(2), "confidence"));
        }
        list.append(li);
      }
    }
    section.append(list);
    box.append(section);
  }
}

// -- controls -----------------------------------------------------------------------

// The shell command that sends the same to the same broker: the page's host, its MQTT
// port (?mqtt=, which `make demo` puts in the address; else the standard one), and over
// TLS the operator bundle's files and login (run it in that bundle's folder).
function publishLine(payload) {
  const tls = location.protocol === "https:";
  const given = params.get("mqtt") || "";
  const port = /^\d{1,5}$/.test(given) ? given : (tls ? 8883 : 1883);
  const user = $("username").value;
  return ["mosquitto_pub", "-h", location.hostname, "-p", port,
    ...(tls ? ["--cafile", "ca.crt", "--cert", "client.crt", "--key", "client.key"] : []),
    ...(user ? ["-u", user, "-P", '"$(cat mqtt-password)"'] : []),
    "-q", "1", "-t", TOPICS.control, "-m", `'${payload}'`].join(" ");
}

function command(cmd) {
  const message = { cmd };
  if (cmd === "auto") {
    const rounds = Number($("auto-rounds").value);
    if (!Number.isInteger(rounds) || rounds < 1) {
      $("reply").textContent = "auto: give a whole number of rounds, 1 or more: nothing sent";
      $("reply").className = "item error";
      return;
    }
    message.rounds = rounds;
  }
  const payload = JSON.stringify(message);
  $("sent").textContent = publishLine(payload);
  if (client === null || !client.connected) {
    $("reply").textContent = "not connected to the broker: nothing sent";
    $("reply").className = "item error";
    return;
  }
  client.publish(TOPICS.control, payload, { qos: 1 }, (err) => {
    if (err) {
      $("reply").textContent = `the broker refused the command: ${err.message}`;
      $("reply").className = "item error";
    } else {
      $("reply").textContent = `${cmd} sent, waiting for the aggregator's reply`;
      $("reply").className = "item muted";
    }
  });
}

// -- connection -----------------------------------------------------------------------

function setConnection(text, kind) {
  $("connection").textContent = text;
  $("connection").className = `badge ${kind}`;
}

function connect() {
  if (client !== null) client.end(true);
  const options = {
    keepalive: 10,
    reconnectPeriod: 2000,
    connectTimeout: 10000,
    clean: true,
    protocolVersion: 5,
    clientId: `console-${Math.random().toString(16).slice(2, 10)}`,
  };
  const username = $("username").value;
  if (username) {
    options.username = username;
    options.password = $("password").value;
  }
  client = mqtt.connect(BROKER_URL, options);
  client.on("connect", () => {
    setConnection("connected", "online");
    const topics = [TOPICS.round, TOPICS.metrics, TOPICS.aggregator, TOPICS.reply,
      TOPICS.statuses, ...TOPICS.events];
    client.subscribe(topics, { qos: 1 }, (err, granted) => {
      const refused = (granted || []).filter((g) => g.qos >= 128).map((g) => g.topic);
      if (err || refused.length) {
        setConnection(`subscription refused: ${err ? err.message : refused.join(", ")}`, "error");
      }
    });
  });
  client.on("message", (topic, payload) => handle(topic, payload));
  client.on("reconnect", () => setConnection("reconnecting", "offline"));
  client.on("offline", () => setConnection("disconnected", "offline"));
  client.on("error", (err) => setConnection(`error: ${err.message}`, "error"));
}

function start() {
  if (typeof MESSAGE_SCHEMAS === "undefined") {
    $("fatal").textContent = "messages.js did not load: the page cannot read any message.";
    $("fatal").hidden = false;
    return;
  }
  if (typeof mqtt === "undefined") {
    $("fatal").textContent =
      "vendor/mqtt.min.js did not load: run `make deps` (it vendors the MQTT client).";
    $("fatal").hidden = false;
    return;
  }
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(site) || !/^[A-Za-z0-9_-]{1,64}$/.test(root)) {
    $("fatal").textContent = "add ?site=<site id> to the address (e.g. ?site=home); " +
      "a root= must be a topic segment too.";
    $("fatal").hidden = false;
    return;
  }
  $("site-name").textContent = `site ${site}`;
  document.title = `fedbell ${site}`;
  $("broker-url").value = BROKER_URL;
  $("username").value = params.get("user") || "";
  for (const button of document.querySelectorAll("button[data-cmd]")) {
    button.addEventListener("click", () => command(button.dataset.cmd));
  }
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  setInterval(renderRound, 1000); // the deadline countdown
  if (!params.get("user")) connect(); // a login needs its password typed first
}

start();
