// Renders the registry's build status (/api/builds, or one build) into
// #builds, and polls it again: every second while a build is queued or
// running, every ten seconds otherwise. Everything from the API goes into
// the page as text, never as markup.
"use strict";
(function () {
  const root = document.getElementById("builds");
  const api = root.dataset.api;
  const single = root.dataset.single === "true";

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    return node;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function duration(ms) {
    if (ms === null || ms === undefined) return "";
    const s = Math.round(ms / 1000);
    return s < 60 ? s + " s" : Math.floor(s / 60) + " min " + (s % 60) + " s";
  }

  function progress(b) {
    const parts = [];
    if (b.detail) parts.push(b.detail);
    // The API says what the step's counts count (its unit), if anything.
    if (b.unit && b.total !== null) {
      parts.push(b.done + " of " + b.total + " " + b.unit + (b.bytes ? ", " + bytes(b.bytes) : ""));
    }
    return parts.join("; ");
  }

  function result(b) {
    if (b.error) return b.error;
    if (b.state !== "done") return "";
    const layers = b.layers_new === null ? "" :
      b.layers_new + " new and " + b.layers_reused + " reused layers, " + bytes(b.bytes_uploaded) + " uploaded";
    const how = b.assembled ? "assembled from the binary cache in " : "built in ";
    return how + duration(b.elapsed_ms) + (layers ? "; " + layers : "");
  }

  function stateCell(b) {
    return el("span", b.state, { class: "state " + b.state });
  }

  function table(builds) {
    if (builds.length === 0) return el("p", "No builds recorded lately.");
    const t = el("table");
    const head = el("tr");
    for (const h of ["image", "state", "step", "progress", "started (UTC)", "elapsed", "result"]) {
      head.appendChild(el("th", h));
    }
    t.appendChild(head);
    for (const b of builds) {
      const row = el("tr", null, { "data-key": b.key, "data-state": b.state });
      const image = el("td");
      image.appendChild(el("a", b.name + ":" + b.tag, { href: b.url }));
      row.appendChild(image);
      const state = el("td");
      state.appendChild(stateCell(b));
      row.appendChild(state);
      row.appendChild(el("td", b.step || ""));
      row.appendChild(el("td", progress(b)));
      row.appendChild(el("td", (b.started_at || "").replace("T", " ").replace("Z", "")));
      row.appendChild(el("td", duration(b.elapsed_ms)));
      row.appendChild(el("td", result(b)));
      t.appendChild(row);
    }
    return t;
  }

  function detail(b) {
    const box = el("div", null, { "data-key": b.key, "data-state": b.state });
    const dl = el("dl");
    const add = (term, value) => {
      if (value === null || value === undefined || value === "") return;
      dl.appendChild(el("dt", term));
      const dd = el("dd");
      if (value instanceof Node) dd.appendChild(value); else dd.textContent = String(value);
      dl.appendChild(dd);
    };
    add("image", b.name + ":" + b.tag);
    add("state", stateCell(b));
    add("step", b.step);
    add("progress", progress(b));
    add("started (UTC)", (b.started_at || "").replace("T", " ").replace("Z", ""));
    add("elapsed", duration(b.elapsed_ms));
    add("result", result(b));
    add("attempt", b.attempt);
    add("image key", b.key);
    box.appendChild(dl);
    if (b.log && b.log.length) {
      box.appendChild(el("h2", "Last lines of the log"));
      box.appendChild(el("pre", b.log.join("\n")));
    }
    return box;
  }

  async function refresh() {
    let busy = false;
    try {
      const response = await fetch(api, { cache: "no-store", headers: { accept: "application/json" } });
      const data = await response.json();
      if (!response.ok) throw new Error((data.errors && data.errors[0].message) || response.statusText);
      const builds = single ? [data] : data.builds;
      busy = builds.some((b) => b.state === "queued" || b.state === "running");
      root.replaceChildren(single ? detail(data) : table(builds),
        el("p", "Updated " + new Date().toISOString().slice(11, 19) + " UTC" + (busy ? "; updating while builds run." : "."), { class: "updated" }));
      root.dataset.refreshed = String(Date.now());
    } catch (error) {
      root.replaceChildren(el("p", "The build status cannot be read right now (" + error.message + "); trying again."));
    }
    setTimeout(refresh, busy ? 1000 : 10000);
  }

  refresh();
})();
