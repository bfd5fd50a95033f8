// The console page. Every value from etcd is attacker-controlled, so the DOM
// is built with textContent only, never innerHTML.
"use strict";

const main = document.getElementById("main");
const errorLine = document.getElementById("error");

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function table(headers, rows) {
  const t = el("table");
  const head = el("tr");
  headers.forEach((h) => head.appendChild(el("th", h)));
  t.appendChild(head);
  rows.forEach((cells) => {
    const tr = el("tr");
    cells.forEach((c) => {
      const td = el("td");
      if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "-" : String(c);
      tr.appendChild(td);
    });
    t.appendChild(tr);
  });
  return t;
}

function link(text, hash) {
  const a = el("a", text);
  a.href = hash;
  return a;
}

async function api(path) {
  const response = await fetch(path);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
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
      o.topics.map((t) => [link(t.name, "#topic/" + encodeURIComponent(t.name)), t.partitions, t.stored_messages])),
    el("h2", "groups (" + o.groups.length + ")"),
    table(["group", "topics", "members", "lag"],
      o.groups.map((g) => [link(g.group, "#group/" + encodeURIComponent(g.group)), g.topics.join(", "), g.members, g.lag])),
  );
}

async function topic(name) {
  const t = await api("/api/topics/" + encodeURIComponent(name));
  main.replaceChildren(
    el("h2", "topic " + t.name),
    el("p", "config: " + JSON.stringify(t.config)),
    el("p", "stored messages: " + t.stored_messages),
    table(["partition", "earliest", "next"], t.partitions.map((p) => [p.partition, p.earliest, p.next])),
  );
}

async function group(name) {
  const g = await api("/api/groups/" + encodeURIComponent(name));
  main.replaceChildren(
    el("h2", "group " + g.group),
    table(["topic", "partition", "owner", "committed", "next", "lag"],
      g.partitions.map((p) => [p.topic, p.partition, p.owner, p.committed, p.next, p.lag])),
  );
}

async function route() {
  errorLine.textContent = "";
  const [page, arg] = location.hash.slice(1).split("/");
  try {
    if (page === "topic") await topic(decodeURIComponent(arg));
    else if (page === "group") await group(decodeURIComponent(arg));
    else await overview();
  } catch (error) {
    errorLine.textContent = String(error.message || error);
  }
}

document.getElementById("home").href = "#";
window.addEventListener("hashchange", route);
route();
