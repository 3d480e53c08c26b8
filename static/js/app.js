// Small progressive enhancements; every page works without them.
(function () {
  "use strict";

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    // Plain-http deployments have no clipboard API: fall back to a temporary selection.
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } finally { document.body.removeChild(area); }
    return Promise.resolve();
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button.copy");
    if (!button) return;
    // Inside a <summary> a click would also fold the node.
    event.preventDefault();
    copyText(button.dataset.path).then(function () {
      var label = button.textContent;
      button.textContent = "copied";
      setTimeout(function () { button.textContent = label; }, 1200);
    });
  });

  // Live messages remove a row before re-inserting it (a page loaded just after a write already shows
  // it), remove deleted sessions' rows, and redraw the rows of every session that changed (the server
  // does not know which of them a filtered list shows). A row this page does not show needs neither,
  // and htmx would log an error for each: such parts are dropped here (hx-ext="ws,live-rows").
  function withoutMissingTargets(text) {
    var holder = document.createElement("template");
    holder.innerHTML = text;
    Array.prototype.slice.call(holder.content.children).forEach(function (child) {
      var oob = child.getAttribute("hx-swap-oob");
      if (oob === null) return;
      // "swap:selector" names its target; "true" or a bare swap style targets the element's own id.
      var colon = oob.indexOf(":");
      var selector = colon > 0 ? oob.slice(colon + 1) : child.id ? "#" + CSS.escape(child.id) : "";
      if (selector && !document.querySelector(selector)) child.remove();
    });
    return holder.innerHTML;
  }
  if (window.htmx) {
    htmx.defineExtension("live-rows", {transformResponse: withoutMissingTargets});
  }

  // The live session list moves a session that was written to the top and puts new ones above the
  // rest: the row under the pointer slid away as the operator clicked, and they opened another
  // session than the one they aimed at. While the mouse rests on the list (or the keyboard is in it)
  // its updates wait, a note says for how many sessions, and they all come in, in order, as it
  // leaves. (Registered before the other live-message handlers: a held message is not one they
  // should see yet.) Past HELD_MAX messages (a pointer left resting on a busy list) they are not
  // kept: the list reloads as the pointer leaves, showing how things are by then.
  var HELD_MAX = 100;
  var held = {live: null, messages: [], count: 0, sessions: {}, timer: null};  // (count > HELD_MAX: reload)
  var replaying = false;
  var arrivingAt = null;  // while held updates come in: when they came (see noteArrivals)
  function isHeldList(live) {
    return live.matches && live.matches("#session-table .live") && window.matchMedia("(hover: hover)").matches;
  }
  function inUse(live) {
    // The mouse on it, or keyboard focus in it (not a click's focus, which stays after the mouse leaves).
    return live.matches(":hover") || !!live.querySelector(":focus-visible");
  }
  function sessionsIn(fragment, into) {
    // The sessions a message's parts are about: rows by id (s-<uuid>), and "delete:#s-<uuid>" targets.
    Array.prototype.forEach.call(fragment.children, function (part) {
      var target = /#s-([0-9a-f-]+)$/.exec(part.getAttribute("hx-swap-oob") || "");
      if (target) into[target[1]] = true;
      if (part.id && part.id.indexOf("s-") === 0) into[part.id.slice(2)] = true;
      part.querySelectorAll("[id^='s-']").forEach(function (row) { into[row.id.slice(2)] = true; });
    });
  }
  function showHeld() {
    // Fixed at the foot of the window, out of the page's flow: a line put above the list pushed its
    // rows down, the very thing holding the updates is for.
    var note = document.getElementById("live-held");
    if (!note) {
      note = document.createElement("p");
      note.id = "live-held";
      note.className = "live-held";
      note.setAttribute("role", "status");
      document.body.appendChild(note);
    }
    var count = Object.keys(held.sessions).length;
    note.textContent = "Live updates paused while you are on the list: " +
      (count === 1 ? "1 session changed." : count + " sessions changed.");
  }
  function releaseHeld() {
    var live = held.live, messages = held.messages, dropped = held.count > HELD_MAX;
    clearInterval(held.timer);
    held = {live: null, messages: [], count: 0, sessions: {}, timer: null};
    var note = document.getElementById("live-held");
    if (note) note.parentNode.removeChild(note);
    if (!live || !live.isConnected) return;  // the list was replaced (a filter changed): it is current
    if (dropped) {
      reloadOrTell(live, "More updates came than the list holds back while you are on it.");
      return;
    }
    replaying = true;
    try {
      messages.forEach(function (message) {
        if (!htmx.trigger(live, "htmx:wsBeforeMessage", {message: message.text})) return;
        // Its times count from when it came, not from now: a row held 30 s read "0 s ago".
        arrivingAt = message.at;
        // As the ws extension swaps a message: every part out of band, none into the socket's element.
        htmx.swap(live, withoutMissingTargets(message.text), {swapStyle: "none", swapDelay: 0, settleDelay: 0});
        htmx.trigger(live, "htmx:wsAfterMessage", {message: message.text});
      });
    } finally {
      replaying = false;
      arrivingAt = null;
    }
  }
  document.addEventListener("htmx:wsBeforeMessage", function (event) {
    var live = event.target;
    if (replaying || !isHeldList(live)) return;
    if (held.live && held.live !== live) releaseHeld();
    if (!held.count && !inUse(live)) return;
    var parts = document.createElement("template");
    parts.innerHTML = withoutMissingTargets(event.detail.message);
    if (!parts.content.children.length) return;  // about rows this list does not show: it changes nothing
    event.preventDefault();
    event.stopImmediatePropagation();
    held.live = live;
    held.count += 1;
    sessionsIn(parts.content, held.sessions);
    held.messages = held.count > HELD_MAX ? [] : held.messages.concat([{text: event.detail.message, at: Date.now()}]);
    showHeld();
    if (!held.timer) {
      held.timer = setInterval(function () {
        if (!held.live || !held.live.isConnected || !inUse(held.live)) releaseHeld();
      }, 250);
    }
  });

  // A live page whose websocket dropped and came back may have missed events meanwhile (versions,
  // status changes): it reloads to show the server's state, unless the operator is typing into a
  // form, who is then told instead.
  // The same goes for a live event that changes the page as a whole (a session archived by someone else).
  var edited = false;
  document.addEventListener("input", function (event) {
    // A filter that applies as soon as it is chosen (a box ticked, an option picked in a form whose
    // address follows it) loses nothing to a reload: the address carries it. Text is typed, not applied.
    var field = event.target;
    var chosen = field.type === "checkbox" || field.type === "radio" || field.type === "date" || field.tagName === "SELECT";
    if (chosen && field.form && field.form.getAttribute("hx-push-url") === "true") return;
    edited = true;
  });

  function reloadOrTell(live, message) {
    if (!edited) {
      window.location.reload();
      return;
    }
    if (document.getElementById("reconnected")) return;
    var notice = document.createElement("p");
    notice.id = "reconnected";
    notice.className = "reconnected";
    notice.setAttribute("role", "status");
    notice.textContent = message + " ";
    var again = document.createElement("a");
    again.href = window.location.href;
    again.textContent = "Reload";
    notice.appendChild(again);
    live.parentNode.insertBefore(notice, live);
  }

  document.addEventListener("htmx:wsOpen", function (event) {
    var live = event.detail.elt;
    if (!live.dataset.wsOpened) {
      live.dataset.wsOpened = "1";
      return;
    }
    reloadOrTell(live, "The live connection dropped and is back: updates may have been missed.");
  });

  // The server closes a live page's socket for good (no reconnect) once its user is signed out
  // (logged out elsewhere, the sign-in expired, the account deactivated) or may no longer see the
  // project. The page went on looking live while nothing reached it any more. It reloads instead:
  // to the sign-in page, which leads back here, or to the page saying it is not there.
  var CLOSED_FOR_GOOD = {4401: "You are signed out: this page no longer updates.",
                         4403: "You may no longer see this: this page no longer updates."};
  document.addEventListener("htmx:wsClose", function (event) {
    var message = CLOSED_FOR_GOOD[event.detail.event.code];
    if (message) reloadOrTell(event.detail.elt, message);
  });

  document.addEventListener("htmx:oobAfterSwap", function (event) {
    var marker = event.target;
    if (marker.id !== "live-reload" || !marker.dataset.reason) return;
    reloadOrTell(marker.closest("[ws-connect]") || marker, marker.dataset.reason + " The page is out of date.");
  });

  // A live update may replace the row the operator is working in (their own pin or label comes back
  // as one, another operator's too): htmx's ws extension swaps it without keeping focus, which
  // threw keyboard users back to the top of the page. The focused control (by id) keeps the focus,
  // an open label form stays open, and text typed but not yet saved stays typed.
  var kept = null;
  document.addEventListener("htmx:wsBeforeMessage", function () {
    var active = document.activeElement;
    var text = active && (active.tagName === "INPUT" || active.tagName === "TEXTAREA");
    kept = active && active.id && active !== document.body
      ? {id: active.id, value: text && active.value !== active.defaultValue ? active.value : null,
         start: text ? active.selectionStart : null, end: text ? active.selectionEnd : null}
      : null;
  });
  document.addEventListener("htmx:wsAfterMessage", function () {
    var again = kept && document.getElementById(kept.id);
    if (again && again !== document.activeElement) {
      for (var details = again.closest("details"); details; details = details.parentElement.closest("details")) {
        details.open = true;
      }
      if (kept.value !== null) again.value = kept.value;
      again.focus({preventScroll: true});
      try { if (kept.start !== null) again.setSelectionRange(kept.start, kept.end); } catch (e) { /* a type without a selection */ }
    }
    kept = null;
  });

  // The versions picked to compare (A and B, radios in the rows) went with a row redrawn by a live
  // update (another operator's pin, a summary arriving) or by the operator's own pin or label, and
  // "Diff A → B" then compared other versions than the ones picked. They are picked again.
  var picked = null;
  function notePicked() {
    picked = Array.prototype.map.call(document.querySelectorAll("input[form=diff-picker]:checked"),
      function (radio) { return [radio.name, radio.value]; });
  }
  function pickAgain() {
    if (!picked) return;
    picked.forEach(function (pick) {
      var radio = document.querySelector("input[form=diff-picker][name=" + CSS.escape(pick[0]) + "][value=" + CSS.escape(pick[1]) + "]");
      if (radio && !radio.checked) radio.checked = true;
    });
    picked = null;
  }
  document.addEventListener("htmx:wsBeforeMessage", notePicked);
  document.addEventListener("htmx:wsAfterMessage", pickAgain);
  document.addEventListener("htmx:beforeSwap", notePicked);
  document.addEventListener("htmx:afterSwap", pickAgain);

  // A session written many times a second adds rows to an open timeline without end: at 20 writes/s,
  // 1,000 rows after a minute, each new one laid out above all the others, and the browser fell
  // minutes behind and stopped answering. The live timeline keeps its newest LIVE_ROWS_KEPT rows; the
  // ones below are dropped and stay a click (or a scroll) away behind "Older versions", which then
  // continues from the last row kept. Not while the operator reads below them.
  var LIVE_ROWS_KEPT = 200;
  document.addEventListener("htmx:wsAfterMessage", function () {
    var timeline = document.getElementById("timeline");
    if (!timeline) return;
    var rows = timeline.querySelectorAll(":scope > li.vrow");
    if (rows.length <= LIVE_ROWS_KEPT) return;
    var last = rows[LIVE_ROWS_KEPT - 1];
    if (last.getBoundingClientRect().bottom < 0) return;
    // _timeline_more.html, rendered into the page with an empty version number; as on a page the
    // server rendered, the next page replaces it as it scrolls into view.
    var blank = document.getElementById("timeline-more");
    if (!blank) return;
    while (last.nextElementSibling) timeline.removeChild(last.nextElementSibling);
    var more = blank.content.firstElementChild.cloneNode(true);
    var link = more.querySelector("a");
    var before = last.id.slice(2);
    link.setAttribute("href", link.getAttribute("href") + before);
    link.setAttribute("hx-get", link.getAttribute("hx-get") + before);
    timeline.appendChild(more);
    htmx.process(more);
  });

  // "Older versions" (loaded as it scrolls into view) and the state tree's "more…" replace themselves
  // with what they load. A keyboard user who had just tabbed onto one lost the focus with it, and the
  // next Tab started again at the top of the page: every 50 versions of a long timeline. The focus
  // moves on to the first thing loaded instead.
  var loadingMore = null;
  document.addEventListener("htmx:beforeSwap", function (event) {
    var target = event.detail.target;
    loadingMore = target && target.matches && target.matches("li.more") && target.contains(document.activeElement)
      ? {parent: target.parentElement, before: target.previousElementSibling} : null;
  });
  document.addEventListener("htmx:afterSwap", function () {
    if (!loadingMore) return;
    var where = loadingMore;
    loadingMore = null;
    var first = where.before ? where.before.nextElementSibling : where.parent.firstElementChild;
    var control = first && first.querySelector("a[href], summary, button");
    if (control) control.focus();
  });

  // An htmx action the server refused (a label too long, a session archived meanwhile) says why next
  // to what was clicked, instead of failing silently.
  function actionNotice(source) {
    var holder = source.closest("li, form, section") || document.body;
    var notice = holder.querySelector(":scope > .action-error");
    if (!notice) {
      notice = document.createElement("p");
      notice.className = "action-error error";
      notice.setAttribute("role", "alert");
      holder.appendChild(notice);
    }
    return notice;
  }
  document.addEventListener("htmx:responseError", function (event) {
    var notice = actionNotice(event.detail.elt);
    // A refusal the server answered with a page (403, 404, 500) says why in its alert: the rest of the
    // page (its title, the top bar, its stylesheet) read as part of the reason.
    var xhr = event.detail.xhr;
    var text = xhr.responseText || "";
    if (/html/i.test(xhr.getResponseHeader("Content-Type") || "")) {
      var doc = new DOMParser().parseFromString(text, "text/html");
      var said = doc.querySelector("main [role=alert], main .empty") || doc.querySelector("main") || doc.body;
      text = said ? said.textContent : "";
    }
    text = text.replace(/\s+/g, " ").trim();
    notice.textContent = "Not done: " + (text.slice(0, 300) || "the server answered " + xhr.status + ".");
  });

  // Once the same control is answered, what it said of the failed try no longer holds.
  document.addEventListener("htmx:afterRequest", function (event) {
    if (!event.detail.successful) return;
    var holder = event.detail.elt.closest("li, form, section");
    var notice = holder && holder.querySelector(":scope > .action-error");
    if (notice) notice.remove();
  });

  // One that got no answer at all (the server restarting, the network down) did nothing visible:
  // a Pin clicked during a deploy looked ignored. Whether it was done is unknown, so the page says so.
  document.addEventListener("htmx:sendError", function (event) {
    actionNotice(event.detail.elt).textContent =
      "No answer from the server (it may be restarting, or the network is down): reload the page to see whether this was done.";
  });

  // A confirm form (rewind, fork, archive) sent after the sign-in had ended goes to sign in and then
  // back to its page (config.middleware.SignInAgainMiddleware), which came back empty: the reason
  // typed at 3 a.m. had to be typed again. What was typed is kept for that trip, in this tab only
  // (sessionStorage), and filled in again when the page comes back from the sign-in page
  // (data-keep-draft names it). Any other page that loads first drops it, as does a trip of over
  // 30 minutes; the operator still reads it and confirms again.
  var DRAFT = "session-rewind-draft";
  function typedIn(field) { return field.tagName === "TEXTAREA" || field.type === "text"; }
  document.addEventListener("submit", function (event) {
    var form = event.target.closest("form[data-keep-draft]");
    if (!form) return;
    var fields = {};
    Array.prototype.forEach.call(form.elements, function (field) {
      if (field.name && typedIn(field)) fields[field.name] = field.value;
    });
    try {
      sessionStorage.setItem(DRAFT, JSON.stringify({
        page: location.pathname + location.search, signIn: form.getAttribute("data-keep-draft"),
        at: Date.now(), fields: fields
      }));
    } catch (error) { /* storage turned off or full: the form works as it did */ }
  });
  (function fillDraft() {
    var draft = null;
    try { draft = JSON.parse(sessionStorage.getItem(DRAFT) || "null"); } catch (error) { return; }
    if (!draft || location.pathname === draft.signIn) return;  // (on its way: a mistyped password shows it again)
    sessionStorage.removeItem(DRAFT);
    var from = "";
    try { from = new URL(document.referrer).pathname; } catch (error) { /* no referrer */ }
    var form = document.querySelector("form[data-keep-draft]");
    if (!form || from !== draft.signIn || draft.page !== location.pathname + location.search
        || Date.now() - draft.at > 30 * 60 * 1000) return;
    Object.keys(draft.fields).forEach(function (name) {
      var field = form.elements.namedItem(name);
      if (field && typedIn(field) && !field.value) field.value = draft.fields[name];
    });
  })();

  document.addEventListener("change", function (event) {
    var form = event.target.closest("form[data-autosubmit]");
    if (form) form.submit();
  });

  // Relative times ({% ago %} in sessions_app/templatetags/rewind.py) move on while the page stays
  // open: a row nothing has changed since the page loaded went on saying "12 s ago" for good, and an
  // engine that stopped looked alive. They count on from the age the server gave (data-ago) since
  // the element arrived, so a browser whose clock is off still reads right. In the words of Django's
  // timesince (two adjacent units) up to four weeks; past that (months) the text stays as it is.
  function plural(count, unit) { return count + "\u00a0" + unit + (count === 1 ? "" : "s"); }
  function agoText(seconds) {
    if (seconds < 60) return Math.max(seconds, 0) + " s ago";
    var minutes = Math.floor(seconds / 60);
    if (minutes < 60) return plural(minutes, "minute") + " ago";
    var hours = Math.floor(minutes / 60);
    if (hours < 24) return plural(hours, "hour") + (minutes % 60 ? ", " + plural(minutes % 60, "minute") : "") + " ago";
    var days = Math.floor(hours / 24);
    if (days < 7) return plural(days, "day") + (hours % 24 ? ", " + plural(hours % 24, "hour") : "") + " ago";
    var weeks = Math.floor(days / 7);
    return plural(weeks, "week") + (days % 7 ? ", " + plural(days % 7, "day") : "") + " ago";
  }
  var arrived = new WeakMap();
  function noteArrivals() {
    var now = arrivingAt === null ? Date.now() : arrivingAt;
    document.querySelectorAll("time[data-ago]").forEach(function (time) {
      if (!arrived.has(time)) arrived.set(time, now);
    });
  }
  // A link to a version's row (#v-308, shared, or from a log) whose row is not on this page of the
  // timeline (an older version, past the newest page) goes to the page that holds it, through "Go to".
  var wanted = /^#v-(\d+)$/.exec(window.location.hash);
  var goto = document.getElementById("timeline-goto");
  if (wanted && goto && !document.getElementById("v-" + wanted[1])) {
    window.location.replace(goto.getAttribute("action") + "?at=" + wanted[1]);
  } else if (wanted && goto) {
    // Come back to (see below): the row, not the old scroll height (the entry left says "manual"; the
    // load event too, should the browser restore it all the same).
    var comeBackTo = function () { document.getElementById("v-" + wanted[1]).scrollIntoView({block: "center"}); };
    comeBackTo();
    window.addEventListener("load", comeBackTo);
  }

  // Back from a version, a diff or a rewind opened from a timeline row came to the newest page at the
  // old scroll height: after "Older versions" had loaded 250 rows, the row was not even on the page.
  // Before such a link leaves, the address names its row (#v-N), and, for a row of an older page
  // (data-older: one "Older versions" loaded), the page that starts at it (?before=N+1): Back opens
  // that, at the row. Not for a click that opens another tab: this page's address stays as it shows.
  document.addEventListener("click", function (event) {
    var link = event.target.closest("a[href]:not([hx-get])");
    var row = link && link.closest("#timeline-section li.vrow");
    if (!row || event.defaultPrevented || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey
        || event.altKey || link.target) return;
    var here = new URL(window.location.href);
    if (row.hasAttribute("data-older")) here.searchParams.set("before", String(Number(row.id.slice(2)) + 1));
    here.hash = row.id;
    history.replaceState(history.state, "", here.toString());
    history.scrollRestoration = "manual";  // (of this entry: Back puts the row in view, see above)
  });

  noteArrivals();
  document.addEventListener("htmx:afterSettle", noteArrivals);
  document.addEventListener("htmx:wsAfterMessage", noteArrivals);
  setInterval(function () {
    noteArrivals();
    var now = Date.now();
    document.querySelectorAll("time[data-ago]").forEach(function (time) {
      var seconds = Number(time.getAttribute("data-ago")) + Math.floor((now - arrived.get(time)) / 1000);
      if (seconds < 28 * 86400) time.textContent = agoText(seconds);
    });
  }, 5000);
})();
