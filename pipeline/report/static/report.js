(function () {
  "use strict";
  var gallery = document.getElementById("gallery");
  if (!gallery) return;
  var slide = gallery.dataset.slide, model = gallery.dataset.model;
  var KEY = "cytopipe-labels:" + slide + ":" + model;
  var NAMES = {malignant: 1, benign: 1, unsure: 1, not_a_cell: 1};
  var cards = Array.prototype.slice.call(gallery.querySelectorAll(".cell"));
  var reviewer = document.getElementById("reviewer");
  var count = document.getElementById("label-count");
  var notice = document.getElementById("storage-notice");
  var state = {labels: {}, reviewer: ""};
  var persistent = true;

  function load() {
    try {
      var raw = window.localStorage.getItem(KEY);
      if (raw) {
        var got = JSON.parse(raw);
        if (got && typeof got === "object") {
          state.reviewer = typeof got.reviewer === "string" ? got.reviewer : "";
          var labels = got.labels || {};
          Object.keys(labels).forEach(function (id) {  // ignore anything hand-edited into an odd shape
            var l = labels[id];
            if (l && NAMES[l.label] === 1) state.labels[id] = l;
          });
        }
      }
    } catch (e) { persistent = false; }
  }
  function save() {
    try { window.localStorage.setItem(KEY, JSON.stringify(state)); }
    catch (e) { persistent = false; }
    if (!persistent) notice.textContent = "This browser does not let the page store labels: export them before closing it.";
  }
  function paint(card) {
    var l = state.labels[card.dataset.cellId];
    card.classList.toggle("labelled", !!l);
    card.querySelectorAll("button[data-label]").forEach(function (b) {
      b.setAttribute("aria-pressed", l && l.label === b.dataset.label ? "true" : "false");
    });
    card.querySelector("button.clear").disabled = !l;
  }
  function tally() {
    var n = 0, by = {};
    cards.forEach(function (c) {
      var l = state.labels[c.dataset.cellId];
      if (l) { n += 1; by[l.label] = (by[l.label] || 0) + 1; }
    });
    var parts = Object.keys(NAMES).filter(function (k) { return by[k]; }).map(function (k) {
      return k.replace(/_/g, " ") + " " + by[k];
    });
    count.textContent = n + " of " + cards.length + " cells labelled" + (parts.length ? " (" + parts.join(", ") + ")" : "");
  }
  function setLabel(card, label) {
    var id = card.dataset.cellId;
    var old = state.labels[id];
    if (label === null || (old && old.label === label)) delete state.labels[id];  // pressing the chosen one clears it
    else state.labels[id] = {label: label, timestamp: new Date().toISOString(), reviewer: reviewer.value.trim()};
    save(); paint(card); tally();
  }
  gallery.addEventListener("click", function (ev) {
    var b = ev.target.closest("button");
    if (!b) return;
    var card = b.closest(".cell");
    if (b.classList.contains("clear")) {
      setLabel(card, null);
      card.querySelector("button[data-label]").focus();  // the clear button is now disabled; keep keyboard focus
    }
    else if (b.dataset.label) setLabel(card, b.dataset.label);
  });
  reviewer.addEventListener("input", function () { state.reviewer = reviewer.value; save(); });

  function csvField(v) {
    v = v === undefined || v === null ? "" : String(v);
    return /[",\r\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;
  }
  document.getElementById("export-labels").addEventListener("click", function () {
    var now = reviewer.value.trim();
    var lines = ["cell_id,x,y,label,reviewer,timestamp,slide,model"];
    cards.forEach(function (c) {
      var l = state.labels[c.dataset.cellId];
      if (!l) return;
      // The initials typed when the label was set; the current ones if none were typed then.
      lines.push([c.dataset.cellId, c.dataset.x, c.dataset.y, l.label, l.reviewer || now, l.timestamp, slide, model]
        .map(csvField).join(","));
    });
    var blob = new Blob([lines.join("\r\n") + "\r\n"], {type: "text/csv;charset=utf-8"});
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = gallery.dataset.stem + "-labels.csv";
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(function () { URL.revokeObjectURL(a.href); }, 10000);
  });

  // Pagination: only the shown page's images get a src, so 500 cells do not decode 1000 images at once.
  var size = parseInt(gallery.dataset.pageSize, 10) || cards.length || 1;
  var pages = Math.max(1, Math.ceil(cards.length / size));
  var pagers = Array.prototype.slice.call(document.querySelectorAll(".pager"));
  var current = 0;
  function show(p) {
    current = Math.min(Math.max(p, 0), pages - 1);
    cards.forEach(function (c, i) {
      var on = Math.floor(i / size) === current;
      c.hidden = !on;
      if (on) c.querySelectorAll("img[data-src]").forEach(function (img) {
        img.src = img.dataset.src; img.removeAttribute("data-src");
      });
    });
    pagers.forEach(function (nav) {
      nav.querySelectorAll("button[data-page]").forEach(function (b) {
        if (+b.dataset.page === current) b.setAttribute("aria-current", "page"); else b.removeAttribute("aria-current");
      });
      nav.querySelector(".prev").disabled = current === 0;
      nav.querySelector(".next").disabled = current === pages - 1;
      nav.querySelector(".page-info").textContent = "Page " + (current + 1) + " of " + pages + " (cells " +
        (current * size + 1) + "-" + Math.min(cards.length, (current + 1) * size) + ")";
    });
  }
  pagers.forEach(function (nav) {
    nav.addEventListener("click", function (ev) {
      var b = ev.target.closest("button");
      if (!b) return;
      if (b.classList.contains("prev")) show(current - 1);
      else if (b.classList.contains("next")) show(current + 1);
      else if (b.dataset.page !== undefined) show(+b.dataset.page);
      if (nav.classList.contains("bottom")) gallery.scrollIntoView();
    });
  });

  load();
  reviewer.value = state.reviewer;
  cards.forEach(paint);
  tally();
  if (pages > 1) show(0);
  gallery.dataset.ready = "1";
})();
