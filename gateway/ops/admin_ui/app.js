// The key-management page of tower-gateway (/admin/ui).
//
// Plain script, no dependencies. Every value that comes from the gateway is put
// into the page with textContent (never innerHTML), so a user id such as
// <img src=x onerror=alert(1)> shows as text. The admin token lives in this
// tab's sessionStorage and travels only in the Authorization header. A new key
// is shown once, in one read-only field, and cleared when dismissed.
"use strict";

(() => {
  const TOKEN_KEY = "tower-gateway.admin-token";
  const PAGE_SIZE = 50;
  const AUDIT_EVENTS = 12;
  // The page's own reads would crowd out everything else: they are left out of the list.
  const QUIET_ACTIONS = new Set(["keys_list", "key_show"]);
  const STATUSES = new Set(["active", "rotating", "expired", "revoked"]);
  // Where a refused create field is typed, to put the focus back on it.
  const CREATE_INPUTS = {
    user_id: "c-user", role: "c-role", scopes: "c-scopes", expires_in_days: "c-days",
    env: "c-env", rate_limit: "c-rate", team: "c-team",
  };

  const $ = (id) => document.getElementById(id);
  const state = { offset: 0, total: 0, filters: {}, target: null, loads: 0 };

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.detail) || `the gateway answered ${status}`);
      this.status = status;
      this.field = body && body.field;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function call(method, path, body) {
    const headers = { Accept: "application/json", Authorization: `Bearer ${token()}` };
    const init = {
      method, headers, cache: "no-store", credentials: "omit", redirect: "error",
      referrerPolicy: "no-referrer",
    };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    // Relative to /admin/ui: "keys" is /admin/keys, also behind a path prefix.
    const response = await fetch(new URL(path, document.baseURI), init);
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (response.status === 401) {
      signOut("The admin token was refused. Sign in again.");
    }
    if (!response.ok) {
      throw new ApiError(response.status, data);
    }
    return data;
  }

  // ------------------------------------------------------------------ small helpers

  function say(text, kind) {
    const box = $("message");
    box.textContent = text;
    box.className = `message ${kind || "info"}`;
    box.hidden = !text;
  }

  function failed(error) {
    if (error instanceof ApiError && error.status === 401) {
      return;
    }
    say(error instanceof ApiError ? `Refused: ${error.message}` : `Failed: ${error.message}`, "error");
  }

  function when(seconds, never) {
    if (seconds === null || seconds === undefined) {
      return never || "never";
    }
    return new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ");
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    if (className) {
      node.className = className;
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) {
      node.removeChild(node.firstChild);
    }
  }

  function number(id) {
    const raw = $(id).value.trim();
    return raw === "" ? null : Number(raw);
  }

  // ------------------------------------------------------------------ signing in and out

  function showApp(signedIn) {
    $("login").hidden = signedIn;
    $("app").hidden = !signedIn;
    $("sign-out").hidden = !signedIn;
    $("cache").hidden = !signedIn;
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    hideNewKey();
    for (const id of ["keys-body", "audit-body", "roles"]) {
      clear($(id));
    }
    for (const id of ["keys-count", "revoke-text", "rotate-text", "extend-text", "cache-ratio",
      "cache-detail"]) {
      $(id).textContent = "";
    }
    for (const form of document.querySelectorAll("form")) {
      form.reset();
    }
    state.filters = {};
    state.offset = 0;
    showApp(false);
    say(message || "", message ? "error" : "info");
    $("token").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const value = $("token").value.trim();
    $("token").value = "";
    if (!value) {
      say("Enter the admin token.", "error");
      $("token").focus();
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    try {
      await call("GET", "cache");
    } catch (error) {
      failed(error);
      return;
    }
    showApp(true);
    say("", "info");
    await refreshAll();
    $("keys-heading").focus();
  }

  // ------------------------------------------------------------------ reading

  async function refreshAll() {
    await Promise.all([loadKeys(), loadCache(), loadAudit(), loadRoles()]);
  }

  async function loadCache() {
    try {
      const stats = await call("GET", "cache");
      $("cache-ratio").textContent = `${(100 * stats.cache_hit_ratio).toFixed(1)} %`;
      $("cache-detail").textContent =
        `(${stats.hits} hits, ${stats.misses} misses, ${stats.valid_cached_keys} keys cached)`;
    } catch (error) {
      failed(error);
    }
  }

  async function loadRoles() {
    try {
      const answer = await call("GET", "config");
      const list = $("roles");
      clear(list);
      for (const role of Object.keys((answer.config && answer.config.roles) || {}).sort()) {
        const option = document.createElement("option");
        option.value = role;
        list.appendChild(option);
      }
    } catch (error) {
      failed(error);
    }
  }

  async function loadKeys() {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(state.offset) });
    for (const [name, value] of Object.entries(state.filters)) {
      if (value) {
        query.set(name, value);
      }
    }
    const load = ++state.loads;
    let answer;
    try {
      answer = await call("GET", `keys?${query}`);
    } catch (error) {
      failed(error);
      return;
    }
    if (load !== state.loads) {
      return; // a newer listing (other filters, another page) was asked for meanwhile
    }
    state.total = answer.total;
    const body = $("keys-body");
    clear(body);
    for (const key of answer.keys) {
      body.appendChild(keyRow(key));
    }
    const first = answer.keys.length ? state.offset + 1 : 0;
    const last = state.offset + answer.keys.length;
    $("keys-count").textContent = answer.total
      ? `Showing ${first}–${last} of ${answer.total} keys`
      : "No keys match.";
    $("prev-page").disabled = state.offset === 0;
    $("next-page").disabled = last >= answer.total;
  }

  function keyRow(key) {
    const row = document.createElement("tr");
    row.dataset.keyId = key.key_id;
    const id = el("td");
    id.appendChild(el("div", key.key_id, "mono"));
    id.appendChild(el("div", `${key.prefix}… · ${key.env}`, "muted mono small"));
    row.appendChild(id);
    const user = el("td", key.user_id, "user");
    if (key.team) {
      user.appendChild(el("div", `team ${key.team}`, "muted small"));
    }
    row.appendChild(user);
    row.appendChild(el("td", key.role));
    row.appendChild(el("td", key.scopes.length ? key.scopes.join(" ") : "–", "mono small"));
    const status = el("td");
    const badge = el("span", key.status, "badge");
    if (STATUSES.has(key.status)) {
      badge.classList.add(`badge-${key.status}`);
    }
    status.appendChild(badge);
    if (key.status === "rotating" && key.rotated_to) {
      status.appendChild(el("div", `→ ${key.rotated_to}`, "muted mono small"));
    }
    row.appendChild(status);
    row.appendChild(el("td", when(key.expires_at), "when"));
    row.appendChild(el("td", when(key.last_used_at, "–"), "when"));
    row.appendChild(el("td", key.requests, "num"));
    const actions = el("td", null, "row-actions");
    // Only changes the store accepts for the key's state are offered.
    const editable = key.status === "active" || (key.status === "expired" && !key.rotated_to);
    if (editable) {
      actions.appendChild(actionButton("Extend", key, openExtend));
    }
    if (key.status === "active") {
      actions.appendChild(actionButton("Rotate", key, openRotate));
    }
    if (key.status !== "revoked") {
      actions.appendChild(actionButton("Revoke", key, openRevoke, "danger"));
    }
    row.appendChild(actions);
    return row;
  }

  function actionButton(label, key, open, className) {
    const button = el("button", label, `small ${className || "quiet"}`);
    button.type = "button";
    button.setAttribute("aria-label", `${label} key ${key.key_id} of user ${key.user_id}`);
    button.addEventListener("click", () => open(key, button));
    return button;
  }

  function auditDetails(event) {
    const parts = [];
    if (event.event === "auth") {
      parts.push(`${event.method || ""} ${event.path || ""}`.trim());
    }
    for (const name of ["key_id", "new_key_id", "user_id", "user", "role", "reason", "client"]) {
      if (event[name] !== undefined && event[name] !== null && event[name] !== "") {
        parts.push(`${name}=${event[name]}`);
      }
    }
    return parts.join("  ");
  }

  async function loadAudit() {
    let answer;
    try {
      answer = await call("GET", `audit?limit=${AUDIT_EVENTS * 5}`);
    } catch (error) {
      failed(error);
      return;
    }
    const body = $("audit-body");
    clear(body);
    const shown = answer.events.filter((e) => !(e.event === "admin" && QUIET_ACTIONS.has(e.action)));
    for (const event of shown.slice(0, AUDIT_EVENTS)) {
      const row = document.createElement("tr");
      row.appendChild(el("td", when(event.ts), "when"));
      const name = event.event === "admin" ? event.action : `${event.event} ${event.decision || ""}`;
      row.appendChild(el("td", name, "mono small"));
      row.appendChild(el("td", event.outcome, event.outcome === "failure" ? "bad" : "good"));
      row.appendChild(el("td", auditDetails(event), "mono small details"));
      body.appendChild(row);
    }
  }

  // ------------------------------------------------------------------ a new key, shown once

  function showNewKey(raw, about) {
    $("new-key-value").value = raw;
    $("new-key-about").textContent = about;
    $("new-key").hidden = false;
    $("copy-key").focus();
  }

  function hideNewKey() {
    $("new-key-value").value = "";
    $("new-key-about").textContent = "";
    $("new-key").hidden = true;
  }

  async function copyKey() {
    const field = $("new-key-value");
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(field.value);
      } else {
        field.select();
        document.execCommand("copy");
      }
      say("Copied. Paste it where it belongs, then hide it.", "ok");
    } catch (_) {
      field.select();
      say("Copying is blocked here: the key is selected, press Ctrl+C.", "error");
    }
  }

  // ------------------------------------------------------------------ changes

  async function create(event) {
    event.preventDefault();
    const body = {
      user_id: $("c-user").value,
      role: $("c-role").value.trim(),
      scopes: $("c-scopes").value.split(/[\s,]+/).filter(Boolean),
      env: $("c-env").value,
    };
    const days = number("c-days");
    const rate = number("c-rate");
    const team = $("c-team").value.trim();
    if (days !== null) body.expires_in_days = days;
    if (rate !== null) body.rate_limit = rate;
    if (team) body.team = team;
    let answer;
    try {
      answer = await call("POST", "keys", body);
    } catch (error) {
      failed(error);
      const input = error.field && CREATE_INPUTS[error.field];
      if (input) $(input).focus();
      return;
    }
    $("create-form").reset();
    const record = answer.record;
    showNewKey(answer.key, `${record.key_id} for user ${record.user_id}, role ${record.role}`);
    say(answer.warning ? `Created, but: ${answer.warning}` : `Created ${record.key_id}.`,
      answer.warning ? "error" : "ok");
    await refreshAll();
  }

  function openDialog(id, key, text, opener) {
    state.target = { key, opener };
    $(id).querySelector("form").reset(); // each time the defaults, not the last key's values
    $(`${id.replace("confirm-", "")}-text`).textContent = text;
    $(id).showModal();
  }

  function closeDialog(dialog) {
    dialog.close();
    const target = state.target;
    state.target = null;
    if (target && target.opener && target.opener.isConnected) target.opener.focus();
  }

  function openRevoke(key, opener) {
    openDialog("confirm-revoke", key,
      `Key ${key.key_id} (${key.prefix}…) of user ${key.user_id} will be refused at once ` +
      "by this gateway and its replicas. This cannot be undone.", opener);
  }

  function openRotate(key, opener) {
    openDialog("confirm-rotate", key,
      `A new key replaces ${key.key_id} of user ${key.user_id}, with the same role and ` +
      "scopes. The old key keeps working for the grace period.", opener);
  }

  function openExtend(key, opener) {
    openDialog("confirm-extend", key,
      `Key ${key.key_id} of user ${key.user_id} expires ${when(key.expires_at)}.`, opener);
  }

  async function confirmed(event, dialogId, run) {
    event.preventDefault();
    const target = state.target;
    if (!target) return;
    try {
      await run(target.key);
    } catch (error) {
      closeDialog($(dialogId));
      failed(error);
      return;
    }
    state.target = null;
    $(dialogId).close();
    await refreshAll();
    if (!$("new-key").hidden) $("copy-key").focus();
  }

  function workersNote(answer) {
    const missing = answer.workers_missing || [];
    return missing.length ? ` Workers ${missing.join(", ")} did not confirm dropping their cache.` : "";
  }

  async function revoke(key) {
    const reason = $("revoke-reason").value.trim() || "revoked";
    const answer = await call("POST", `keys/${encodeURIComponent(key.key_id)}/revoke`, { reason });
    say(`Revoked ${key.key_id}.${workersNote(answer)}`, "ok");
  }

  async function rotate(key) {
    const grace = number("rotate-grace");
    const answer = await call("POST", `keys/${encodeURIComponent(key.key_id)}/rotate`, {
      grace_hours: grace === null ? 24 : grace,
    });
    showNewKey(answer.key,
      `${answer.record.key_id} replaces ${key.key_id}, which works until ` +
      `${when(answer.previous.expires_at)}`);
    say(`Rotated ${key.key_id}.${workersNote(answer)}`, "ok");
  }

  async function extend(key) {
    const days = number("extend-days");
    const answer = await call("PATCH", `keys/${encodeURIComponent(key.key_id)}`, {
      expires_in_days: days,
    });
    say(`${key.key_id} now expires ${when(answer.record.expires_at)}.${workersNote(answer)}`, "ok");
  }

  // ------------------------------------------------------------------ wiring

  function filter(event) {
    event.preventDefault();
    state.filters = {
      user_id: $("f-user").value, role: $("f-role").value.trim(), status: $("f-status").value,
    };
    state.offset = 0;
    loadKeys();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut());
    $("create-form").addEventListener("submit", create);
    $("filter-form").addEventListener("submit", filter);
    $("clear-filters").addEventListener("click", (event) => {
      $("filter-form").reset();
      filter(event);
    });
    $("refresh").addEventListener("click", refreshAll);
    $("prev-page").addEventListener("click", () => {
      state.offset = Math.max(0, state.offset - PAGE_SIZE);
      loadKeys();
    });
    $("next-page").addEventListener("click", () => {
      state.offset += PAGE_SIZE;
      loadKeys();
    });
    $("copy-key").addEventListener("click", copyKey);
    $("dismiss-key").addEventListener("click", () => {
      hideNewKey();
      say("The key is hidden and cannot be shown again.", "info");
    });
    $("revoke-form").addEventListener("submit", (e) => confirmed(e, "confirm-revoke", revoke));
    $("rotate-form").addEventListener("submit", (e) => confirmed(e, "confirm-rotate", rotate));
    $("extend-form").addEventListener("submit", (e) => confirmed(e, "confirm-extend", extend));
    for (const dialog of document.querySelectorAll("dialog")) {
      dialog.addEventListener("cancel", (event) => {
        event.preventDefault();
        closeDialog(dialog);
      });
      for (const button of dialog.querySelectorAll("[data-close]")) {
        button.addEventListener("click", () => closeDialog(dialog));
      }
    }
    if (token()) {
      showApp(true);
      refreshAll();
    } else {
      showApp(false);
      $("token").focus();
    }
  });
})();
