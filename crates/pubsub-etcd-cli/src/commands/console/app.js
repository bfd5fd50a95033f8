// The console page. Every value from etcd is attacker-controlled, so the DOM
// is built with textContent only, never innerHTML.
"use strict";

const main = document.getElementById("main");
const errorLine = document.getElementById("error");
const SVG = "http://www.w3.org/2000/svg";
// Rows a live tail keeps on the page; older ones are dropped.
const TAIL_ROWS = 200;

// What the current page must stop when another is shown (a tail, a timer).
let leave = () => {};
// Whether the console was started with --allow-writes; the write forms are
// shown only then, and each write sends the token typed in the header.
let writes = false;
const tokenInput = document.getElementById("token");

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function cell(c) {
  const td = el("td");
  if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "-" : String(c);
  return td;
}

function row(cells) {
  const tr = el("tr");
  cells.forEach((c) => tr.appendChild(cell(c)));
  return tr;
}

function table(headers, rows) {
  const t = el("table");
  const head = el("tr");
  headers.forEach((h) => head.appendChild(el("th", h)));
  t.appendChild(head);
  rows.forEach((cells) => t.appendChild(row(cells)));
  return t;
}

function link(text, hash) {
  const a = el("a", text);
  a.href = hash;
  return a;
}

function hash(...parts) {
  return "#" + parts.map((p) => encodeURIComponent(p)).join("/");
}

async function api(path) {
  const response = await fetch(path);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function write(method, path, body) {
  const headers = { "Authorization": "Bearer " + tokenInput.value };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

// A small form: labelled inputs and buttons, each button running its action
// with the inputs' values and showing the answer (or the error) below.
function form(title, fields, buttons) {
  const box = el("fieldset");
  box.appendChild(el("legend", title));
  const inputs = {};
  fields.forEach(([name, placeholder]) => {
    const input = el("input");
    input.name = name;
    input.placeholder = placeholder;
    inputs[name] = input;
    box.appendChild(input);
  });
  const result = el("pre");
  buttons.forEach(([label, action]) => {
    const button = el("button", label);
    button.type = "button";
    button.addEventListener("click", async () => {
      const values = {};
      Object.entries(inputs).forEach(([name, input]) => { values[name] = input.value; });
      try {
        result.textContent = JSON.stringify(await action(values), null, 1);
        errorLine.textContent = "";
      } catch (error) {
        result.textContent = "";
        errorLine.textContent = String(error.message || error);
      }
    });
    box.appendChild(button);
  });
  box.appendChild(result);
  return box;
}

function time(ms) {
  return ms === null || ms === undefined ? "-" : new Date(ms).toISOString();
}

function hex(base64) {
  return Array.from(atob(base64), (c) => c.charCodeAt(0).toString(16).padStart(2, "0")).join(" ");
}

// Text as text; binary data as hex and base64.
function bytes(text, base64) {
  if (base64 === undefined) return text;
  const box = el("div");
  box.appendChild(el("div", "hex: " + hex(base64)));
  box.appendChild(el("div", "base64: " + base64));
  return box;
}

function headers(m) {
  const list = Object.entries(m.headers || {}).map(([k, v]) => k + "=" + v);
  Object.entries(m.headers_base64 || {}).forEach(([k, v]) => list.push(k + " (base64)=" + v));
  return list.join(", ");
}

const MESSAGE_COLUMNS = ["partition", "offset", "timestamp", "key", "value", "headers"];

// `action`, if given, makes each row's last cell (a delete button).
function messageTable(list, action) {
  const t = table(action ? MESSAGE_COLUMNS.concat([""]) : MESSAGE_COLUMNS, []);
  t.className = "messages";
  list.forEach((m) => {
    const tr = messageRow(m);
    if (action) tr.appendChild(cell(action(m)));
    t.appendChild(tr);
  });
  return t;
}

function messageRow(m) {
  return row([m.partition, m.offset, time(m.timestamp), bytes(m.key, m.key_base64),
    bytes(m.value, m.value_base64), headers(m)]);
}

async function overview() {
  const o = await api("/api/overview");
  main.replaceChildren(
    el("h2", "etcd"),
    el("p", o.problems.length ? "problems: " + o.problems.join("; ") : "no problems"),
    table(["member", "endpoint", "leader", "db size", "in use", "quota free %", "error"],
      o.etcd.members.map((m) => [m.name, m.endpoint, m.leader, m.db_size, m.db_size_in_use, m.headroom_pct, m.error])),
    el("p", o.etcd.alarms.length ? "alarms: " + o.etcd.alarms.map((a) => a.alarm).join(", ") : "no alarms"),
    el("h2", "topics (" + o.topics.length + ")"),
    table(["topic", "partitions", "stored messages"],
      o.topics.map((t) => [link(t.name, hash("topic", t.name)), t.partitions, t.stored_messages])),
    writes ? form("create a topic", [["name", "name"], ["partitions", "partitions"]], [
      ["create", (v) => write("POST", "/api/topics", { name: v.name, partitions: Number(v.partitions) })],
    ]) : el("span"),
    el("h2", "groups (" + o.groups.length + ")"),
    table(["group", "topics", "members", "lag"],
      o.groups.map((g) => [link(g.group, hash("group", g.group)), g.topics.join(", "), g.members, g.lag])),
  );
}

async function topic(name) {
  const t = await api("/api/topics/" + encodeURIComponent(name));
  main.replaceChildren(
    el("h2", "topic " + t.name),
    el("p", "config: " + JSON.stringify(t.config)),
    el("p", "stored messages: " + t.stored_messages + ", newest: " + time(t.last_timestamp_ms)),
    link("live tail", hash("tail", t.name)),
    table(["partition", "earliest", "next", "stored", "write rate (msg/s)", ""],
      t.partitions.map((p) => [p.partition, p.earliest, p.next, p.next - p.earliest,
        p.write_rate === null ? "-" : p.write_rate.toFixed(1),
        link("messages", hash("messages", t.name, p.partition, p.earliest))])),
  );
  if (!writes) return;
  const path = "/api/topics/" + encodeURIComponent(name);
  main.append(
    form("produce a message", [["key", "key (optional)"], ["value", "value"]], [
      ["send", (v) => write("POST", path + "/messages", v.key === "" ? { value: v.value } : v)],
    ]),
    form("delete this topic and its messages", [], [
      ["delete topic", async () => {
        if (!confirm("Delete topic " + name + " and all its messages?")) return "not deleted";
        const answer = await write("DELETE", path);
        location.hash = "#";
        return answer;
      }],
    ]),
  );
}

async function messages(name, partition, from) {
  const page = await api("/api/topics/" + encodeURIComponent(name) + "/partitions/" +
    encodeURIComponent(partition) + "/messages?from=" + encodeURIComponent(from));
  const next = link("next page", hash("messages", name, partition, page.next_offset));
  main.replaceChildren(
    el("h2", "topic " + name + ", partition " + partition + ", from offset " + from),
    link("back to the topic", hash("topic", name)),
    messageTable(page.messages, writes ? (m) => {
      const button = el("button", "delete");
      button.addEventListener("click", async () => {
        if (!confirm("Delete the message at offset " + m.offset + "?")) return;
        try { await write("DELETE", "/api/topics/" + encodeURIComponent(name) + "/partitions/" + m.partition + "/messages/" + m.offset); route(); }
        catch (error) { errorLine.textContent = String(error.message || error); }
      });
      return button;
    } : null),
    page.messages.length ? next : el("p", "no more messages"),
  );
}

function tail(name) {
  const partition = el("input");
  partition.placeholder = "all partitions";
  partition.id = "tail-partition";
  const key = el("input");
  key.placeholder = "key contains";
  key.id = "tail-key";
  const state = el("p", "connecting");
  state.id = "tail-state";
  const rows = messageTable([]);
  rows.id = "tail";
  let source = null;
  const connect = () => {
    if (source) source.close();
    const query = new URLSearchParams();
    if (partition.value !== "") query.set("partition", partition.value);
    if (key.value !== "") query.set("key", key.value);
    source = new EventSource("/api/topics/" + encodeURIComponent(name) + "/tail?" + query);
    source.onopen = () => { state.textContent = "following new messages"; };
    source.addEventListener("message", (event) => {
      rows.insertBefore(messageRow(JSON.parse(event.data)), rows.children[1] || null);
      while (rows.children.length > TAIL_ROWS + 1) rows.removeChild(rows.lastChild);
    });
    source.addEventListener("problem", (event) => {
      state.textContent = "problem: " + JSON.parse(event.data).error;
    });
    source.onerror = () => { state.textContent = "disconnected; retrying"; };
  };
  partition.addEventListener("change", connect);
  key.addEventListener("change", connect);
  main.replaceChildren(el("h2", "live tail of " + name), partition, key, state, rows);
  connect();
  leave = () => source.close();
}

// Total lag over time as a polyline in an inline SVG.
function lagChart(history) {
  const width = 600, height = 120, pad = 4;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("id", "lag-chart");
  svg.setAttribute("class", "chart");
  if (!history.length) return svg;
  const t0 = history[0].at_ms, t1 = history[history.length - 1].at_ms;
  const top = Math.max(1, ...history.map((h) => h.lag));
  const x = (t) => pad + (t1 === t0 ? 0 : (t - t0) / (t1 - t0) * (width - 2 * pad));
  const y = (lag) => height - pad - lag / top * (height - 2 * pad);
  // A single sample is drawn as a flat line across the chart.
  const points = history.length > 1 ? history.map((h) => x(h.at_ms) + "," + y(h.lag))
    : [pad + "," + y(history[0].lag), (width - pad) + "," + y(history[0].lag)];
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.appendChild(line);
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("x", pad);
  label.setAttribute("y", 14);
  label.textContent = "max " + top;
  svg.appendChild(label);
  return svg;
}

async function group(name) {
  const live = el("div");
  const show = (g) => live.replaceChildren(
    el("h2", "group " + g.group),
    el("p", "total lag: " + g.lag),
    lagChart(g.history),
    el("p", "lag since " + (g.history.length ? time(g.history[0].at_ms) : "-")),
    el("h3", "members"),
    table(["member", "owns"], g.members.map((m) => [m.member, m.partitions.map((p) => p.topic + ":" + p.partition).join(", ")])),
    el("h3", "partitions"),
    table(["topic", "partition", "owner", "committed", "next", "lag"],
      g.partitions.map((p) => [p.topic, p.partition, p.owner, p.committed, p.next, p.lag])),
  );
  show(await api("/api/groups/" + encodeURIComponent(name)));
  main.replaceChildren(live);
  if (writes) {
    const reset = (execute) => (v) => {
      const to = v.to === "earliest" || v.to === "latest" ? v.to
        : v.to.startsWith("shift:") ? { shift_by: Number(v.to.slice(6)) } : { offset: Number(v.to) };
      return write("POST", "/api/groups/" + encodeURIComponent(name) + "/reset-offsets",
        { topic: v.topic, to, execute });
    };
    main.appendChild(form("reset offsets (the group must be stopped)",
      [["topic", "topic"], ["to", "earliest, latest, N or shift:N"]],
      [["preview", reset(false)], ["execute", reset(true)]]));
  }
  const timer = setInterval(async () => {
    try { show(await api("/api/groups/" + encodeURIComponent(name))); }
    catch (error) { errorLine.textContent = String(error.message || error); }
  }, 2000);
  leave = () => clearInterval(timer);
}

async function route() {
  leave();
  leave = () => {};
  errorLine.textContent = "";
  const [page, ...args] = location.hash.slice(1).split("/").map(decodeURIComponent);
  try {
    if (page === "topic") await topic(args[0]);
    else if (page === "messages") await messages(args[0], args[1], args[2] || "0");
    else if (page === "tail") tail(args[0]);
    else if (page === "group") await group(args[0]);
    else await overview();
  } catch (error) {
    errorLine.textContent = String(error.message || error);
  }
}

document.getElementById("home").href = "#";
window.addEventListener("hashchange", route);
api("/api/console").then((about) => {
  writes = about.allow_writes;
  tokenInput.hidden = !writes;
}).catch(() => {}).finally(route);
