// The promptcache dashboard: reads /api/summary and /api/recent every few seconds.
// Plain DOM, no build step. Everything user-supplied (prompts, ids) goes in as textContent.
"use strict";

const REFRESH_MS = 5000;
const TIERS = ["exact", "semantic", "coalesced", "miss", "bypass", "rejected", "failed"];
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

const num = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
const pct = (x) => (x === null || x === undefined ? "—" : (x * 100).toFixed(1) + "%");
const ms = (x) => (x === null || x === undefined ? "—" : x < 1000 ? x.toFixed(1) + " ms"
  : (x / 1000).toFixed(2) + " s");
function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function duration(s) {
  if (!s) return "0 s";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
const color = (tier) => `var(--${TIERS.includes(tier) ? tier : "bypass"})`;

async function getJSON(url) {
  // the admin token, when one is entered: with signed image URLs the recent results need it
  const token = $("token").value.trim();
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(url, { cache: "no-store", headers });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

function renderHealth(health, workers) {
  const box = $("health");
  box.replaceChildren();
  const names = { redis: "Redis", cache_store: "cache store", postgresql: "PostgreSQL",
    generator: "generator" };
  for (const [key, label] of Object.entries(names)) {
    const h = health[key] || { status: "unknown" };
    const text = key === "generator" && h.name ? `${label} (${h.name})` : label;
    const pill = el("span", { class: "pill " + h.status.replace(" ", "-"),
      "data-part": key, title: h.detail || h.status }, `${text}: ${h.status}`);
    box.append(pill);
  }
  box.append(el("span", { class: "pill " + (workers ? "ok" : "unknown"), "data-part": "workers" },
    `workers: ${workers}`));
}

function renderCards(s) {
  const db = s.database, streams = s.streams;
  for (const span of document.querySelectorAll(".since")) {
    span.textContent = db ? `(last ${db.since_hours} h)` : "";
  }
  $("requests").textContent = num(db && db.requests);
  $("requests-sub").textContent = db ? "" : "PostgreSQL unavailable";
  $("hit-rate").textContent = pct(db && db.hit_rate);
  $("hit-rate-sub").textContent = db ? `${num(db.generator_calls_avoided)} answered from cache` : "";
  const rates = s.rates || {};
  $("rate").textContent = rates.per_second === null || rates.per_second === undefined
    ? "—" : rates.per_second.toFixed(2);
  $("rate-sub").textContent = rates.over_seconds ? `over ${rates.over_seconds} s` : "measuring…";
  $("generator-calls").textContent = num(db && db.generator_calls);
  $("generator-sub").textContent = db ? `${num(db.generator_calls_avoided)} avoided` : "";
  $("seconds-saved").textContent = db ? duration(db.generator_seconds_avoided) : "—";
  $("seconds-sub").textContent = db ? `${duration(db.generator_seconds)} spent generating` : "";
  const stored = streams ? streams.stored_bytes : null;
  $("storage").textContent = bytes(stored);
  const share = s.storage_limit && stored !== null ? stored / s.storage_limit : 0;
  $("storage-bar").style.width = Math.min(share * 100, 100).toFixed(1) + "%";
  $("storage-sub").textContent = `of ${bytes(s.storage_limit)} (${(share * 100).toFixed(1)}%)`;
  $("entries").textContent = num(streams && streams.entries);
  const ev = db ? Object.entries(db.evictions) : [];
  $("evictions").textContent = ev.length
    ? "evicted: " + ev.map(([why, v]) => `${num(v.evictions)} ${why}`).join(", ")
    : "no evictions";
}

function renderHourly(db) {
  const svg = $("hourly");
  svg.replaceChildren();
  const legend = $("legend");
  legend.replaceChildren();
  if (!db) return;
  const hours = Object.keys(db.hourly).sort();
  const seen = new Set();
  const max = Math.max(1, ...hours.map((h) => Object.values(db.hourly[h]).reduce((a, b) => a + b, 0)));
  const slots = Math.max(hours.length, 12), w = 720 / slots;
  const ns = "http://www.w3.org/2000/svg";
  hours.forEach((hour, i) => {
    let y = 170;
    const counts = db.hourly[hour];
    for (const tier of TIERS) {
      const n = counts[tier] || 0;
      if (!n) continue;
      seen.add(tier);
      const h = (n / max) * 160;
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", i * w + 2); rect.setAttribute("width", Math.max(w - 4, 1));
      rect.setAttribute("y", y - h); rect.setAttribute("height", h);
      rect.setAttribute("fill", color(tier));
      const title = document.createElementNS(ns, "title");
      title.textContent = `${hour}: ${n} ${tier}`;
      rect.append(title);
      svg.append(rect);
      y -= h;
    }
  });
  for (const tier of TIERS) {
    if (seen.has(tier)) legend.append(el("span", { style: `--c: ${color(tier)}` }, tier));
  }
}

function renderLatency(db) {
  const body = $("latency").tBodies[0];
  body.replaceChildren();
  if (!db) return;
  for (const [tier, row] of Object.entries(db.by_tier)) {
    body.append(el("tr", { "data-tier": tier }, el("td", {}, tier), el("td", {}, num(row.requests)),
      el("td", {}, ms(row.p50_ms)), el("td", {}, ms(row.p95_ms)), el("td", {}, ms(row.p99_ms))));
  }
}

function renderStreams(streams) {
  const body = $("streams").tBodies[0];
  body.replaceChildren();
  if (!streams) return;
  for (const [name, info] of Object.entries(streams.streams)) {
    const groups = Object.entries(info.groups);
    if (!groups.length) groups.push(["—", { lag: null, pending: null }]);
    for (const [group, g] of groups) {
      const short = name.slice(name.lastIndexOf(":") + 1);  // the prefix is the same for all
      body.append(el("tr", {}, el("td", { class: "name", title: name }, short),
        el("td", {}, num(info.length)), el("td", {}, group), el("td", {}, num(g.lag)),
        el("td", {}, num(g.pending))));
    }
  }
}

function say(text) { $("message").textContent = text; }

async function showServed(entryId) {
  const box = $("served");
  box.hidden = false;
  box.replaceChildren(el("h2", {}, `requests served by ${entryId}`));
  try {
    const data = await getJSON(`/api/entries/${encodeURIComponent(entryId)}/served`);
    const table = el("table", { class: "served-table" }, el("thead", {}, el("tr", {},
      el("th", {}, "request"), el("th", {}, "tier"), el("th", {}, "latency"), el("th", {}, "at"))));
    const body = el("tbody");
    for (const row of data.requests) {
      body.append(el("tr", {}, el("td", {}, row.request_id + (row.generated ? " (generated it)" : "")),
        el("td", {}, row.tier), el("td", {}, ms(row.latency_ms)),
        el("td", {}, new Date(row.at * 1000).toLocaleString())));
    }
    table.append(body);
    box.append(data.requests.length ? table : el("div", { class: "sub" }, "none recorded yet"));
  } catch (err) {
    box.append(el("div", { class: "sub" }, String(err)));
  }
}

async function flag(entryId, reason) {
  const token = $("token").value.trim();
  sessionStorage.setItem("promptcache-token", token);
  const response = await fetch(`/api/entries/${encodeURIComponent(entryId)}/flag`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify({ reason: reason || null }),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    say(`flag refused (${response.status}): ${data.message || response.statusText}`);
    return;
  }
  say(`flagged ${entryId}: evicted ${data.evicted.join(", ")}; it will not be served again`);
  await refresh(true);
}

function tile(r) {
  const node = el("div", { class: "tile", "data-entry-id": r.entry_id || "",
    "data-request-id": r.request_id, "data-cache": r.cache || r.status });
  node.append(r.thumbnail
    ? el("a", { href: r.image || "#", target: "_blank", rel: "noopener" },
      el("img", { class: "thumb", src: r.thumbnail, alt: r.prompt || "", loading: "lazy" }))
    : el("div", { class: "thumb none" }));
  const facts = el("div", { class: "facts" },
    el("span", { class: "badge", style: `--c: ${color(r.cache || r.status)}` },
      r.cache || r.status),
    r.similarity !== null && r.similarity !== undefined
      ? el("span", { class: "similarity" }, `sim ${r.similarity.toFixed(3)}`) : null,
    el("span", { class: "latency" }, ms(r.latency_ms)));
  const meta = el("div", { class: "meta" },
    el("div", { class: "prompt", title: r.prompt || r.error || "" }, r.prompt || r.error || ""),
    facts);
  if (r.entry_id) {
    const actions = el("div", { class: "actions" },
      el("button", { class: "served-btn", onclick: () => showServed(r.entry_id) }, "served to"),
      el("button", { class: "flag danger", onclick: () => {
        if (meta.querySelector(".confirm")) return;
        const reason = el("input", { class: "reason", placeholder: "reason" });
        meta.append(el("div", { class: "confirm" }, reason,
          el("button", { class: "confirm-flag danger",
            onclick: () => flag(r.entry_id, reason.value) }, "flag")));
      } }, "flag as bad…"));
    meta.append(actions);
  }
  node.append(meta);
  return node;
}

async function refreshRecent(force = false) {
  let data;
  try {
    data = await getJSON("/api/recent?count=48");
  } catch (err) {
    // 403: image URLs are signed and the recent results need the admin token
    $("grid").replaceChildren(el("div", { class: "sub" },
      "recent results: enter the admin token below to see them (image URLs are signed)"));
    return;
  }
  const grid = $("grid");
  // do not pull a half-filled flag form from under the operator
  if (!force && grid.querySelector(".tile .confirm")) return;
  grid.replaceChildren(...data.results.map(tile));
  if (!data.results.length) grid.append(el("div", { class: "sub" }, "no results yet"));
}

function renderScopes(scopes) {
  // the filter's choices: the scopes with results lately ("" is the shared scope)
  const select = $("scope");
  const chosen = select.value;
  const wanted = ["", ...scopes.map((s) => s || "-")];
  const have = [...select.options].map((o) => o.value);
  if (wanted.length === have.length && wanted.every((v, i) => v === have[i])) return;
  const label = (v) => (v === "" ? "all" : v === "-" ? "shared" : v);
  select.replaceChildren(...wanted.map((v) => el("option", { value: v }, label(v))));
  if (wanted.includes(chosen)) select.value = chosen;
}

async function refresh(force = false) {
  try {
    const scope = $("scope").value;
    const s = await getJSON("/api/summary" + (scope ? `?scope=${encodeURIComponent(scope)}` : ""));
    renderScopes(s.scopes || []);
    const workers = s.streams ? s.streams.workers.length : 0;
    renderHealth(s.health, workers);
    renderCards(s);
    renderHourly(s.database);
    renderLatency(s.database);
    renderStreams(s.streams);
    await refreshRecent(force);
    $("updated").textContent = new Date().toLocaleTimeString();
    document.body.dataset.loaded = "true";
  } catch (err) {
    say(`refresh failed: ${err}`);
  }
}

$("token").value = sessionStorage.getItem("promptcache-token") || "";
$("scope").addEventListener("change", () => refresh(true));
refresh();
setInterval(refresh, REFRESH_MS);
