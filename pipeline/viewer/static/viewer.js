// cytopipe view: OpenSeadragon with the cells of cells.csv drawn on one canvas, a gallery of the top cells,
// and labels saved by the server to the report folder's labels.csv.
(function () {
  "use strict";
  var COLOURS = {"malignant": "#ff2a2a", "indeterminate": "#ff9d00", "benign": "#25c43a", "out of domain": "#3fa0ff"};
  var LABELS = [["malignant", "malignant"], ["benign", "benign"], ["unsure", "unsure"], ["not_a_cell", "not a cell"]];
  var state = {cells: [], byId: {}, labels: {}, shown: {}, selected: null};
  var statusEl = document.getElementById("status");
  var reviewer = document.getElementById("reviewer");
  try { reviewer.value = localStorage.getItem("cytopipe-view-reviewer") || ""; } catch (e) { /* private mode */ }
  reviewer.addEventListener("input", function () {
    try { localStorage.setItem("cytopipe-view-reviewer", reviewer.value.trim()); } catch (e) { /* ignore */ }
  });

  function getJSON(url) {
    return fetch(url).then(function (r) {
      if (!r.ok) throw new Error(url + ": HTTP " + r.status);
      return r.json();
    });
  }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function say(text) { statusEl.textContent = text; }

  function loadCells(table) {
    var col = {};
    table.columns.forEach(function (c, i) { col[c] = i; });
    state.cells = table.data.map(function (r) {
      var cell = {};
      table.columns.forEach(function (c, i) { cell[c] = r[i]; });
      cell.id = String(r[col.cell_id]);
      return cell;
    });
    state.cells.forEach(function (c) { state.byId[c.id] = c; });
  }

  // ------------------------------------------------------------------ the viewer and its overlay
  var viewer = OpenSeadragon({
    // OpenSeadragon binds our own text buttons (viewer.html), so none of its button images are needed.
    id: "viewer", tileSources: "/slide.dzi",
    zoomInButton: "zoom-in", zoomOutButton: "zoom-out", homeButton: "zoom-home", fullPageButton: "full-page",
    showNavigator: true, visibilityRatio: 0.2, maxZoomPixelRatio: 4, animationTime: 0.6,
    gestureSettingsMouse: {clickToZoom: false}
  });
  window.viewer = viewer;
  var canvas = el("canvas", {id: "overlay"});
  viewer.canvas.appendChild(canvas);  // under the navigator and the buttons
  // The slide's own TiledImage: image <-> screen conversions go through it, not through the viewport, whose
  // conversions are wrong (and log an error) once the heat map makes the world hold two items.
  var slideItem = null;
  viewer.addHandler("open", function () { slideItem = viewer.world.getItemAt(0); syncHeat(); draw(); });

  function draw() {
    var W = viewer.element.clientWidth, H = viewer.element.clientHeight, ratio = window.devicePixelRatio || 1;
    if (canvas.width !== W * ratio || canvas.height !== H * ratio) {
      canvas.width = W * ratio; canvas.height = H * ratio; canvas.style.width = W + "px"; canvas.style.height = H + "px";
    }
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, W, H);
    if (!slideItem) return;
    var o = slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    var s = slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0)).x - o.x;
    s /= 1000;
    var drawn = 0, byCat = {};
    Object.keys(COLOURS).forEach(function (k) { byCat[k] = []; });
    state.cells.forEach(function (c) {
      if (!state.shown[c.category]) return;
      var x0 = o.x + c.x0 * s, y0 = o.y + c.y0 * s, x1 = o.x + c.x1 * s, y1 = o.y + c.y1 * s;
      if (x1 < 0 || y1 < 0 || x0 > W || y0 > H) return;
      (byCat[c.category] || (byCat[c.category] = [])).push([x0, y0, x1, y1, c]);
    });
    Object.keys(byCat).forEach(function (cat) {
      ctx.strokeStyle = ctx.fillStyle = COLOURS[cat] || "#fff";
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      byCat[cat].forEach(function (b) {
        if (b[2] - b[0] < 4) ctx.rect((b[0] + b[2]) / 2 - 1.5, (b[1] + b[3]) / 2 - 1.5, 3, 3);
        else ctx.rect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
        drawn++;
      });
      ctx.stroke();
      ctx.lineWidth = 1; ctx.strokeStyle = "#fff"; ctx.setLineDash([3, 3]);
      ctx.beginPath();  // labelled cells: a white dashed ring around the box
      byCat[cat].forEach(function (b) {
        if (state.labels[b[4].id]) ctx.rect(b[0] - 3, b[1] - 3, b[2] - b[0] + 6, b[3] - b[1] + 6);
      });
      ctx.stroke(); ctx.setLineDash([]);
    });
    var sel = state.selected && state.byId[state.selected];
    if (sel) {
      ctx.strokeStyle = "#ffff00"; ctx.lineWidth = 3;
      ctx.strokeRect(o.x + sel.x0 * s - 5, o.y + sel.y0 * s - 5, (sel.x1 - sel.x0) * s + 10, (sel.y1 - sel.y0) * s + 10);
    }
    canvas.dataset.drawn = String(drawn);
  }
  viewer.addHandler("update-viewport", draw);
  viewer.addHandler("resize", draw);

  function hitTest(p, slack) {
    var best = null, bestD = Infinity;
    state.cells.forEach(function (c) {
      if (!state.shown[c.category]) return;
      if (p.x < c.x0 - slack || p.x > c.x1 + slack || p.y < c.y0 - slack || p.y > c.y1 + slack) return;
      var d = Math.pow(p.x - c.x, 2) + Math.pow(p.y - c.y, 2);
      if (d < bestD) { bestD = d; best = c; }
    });
    return best;
  }
  viewer.addHandler("canvas-click", function (e) {
    if (!e.quick || !slideItem) return;
    var p = slideItem.viewerElementToImageCoordinates(e.position);
    var s = slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0)).x -
            slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0)).x;
    var hit = hitTest(p, 6 / (s / 1000));  // 6 screen pixels of slack around small boxes
    if (hit) { e.preventDefaultAction = true; select(hit.id); }
  });

  // ------------------------------------------------------------------ the heat map layer
  // score-slide's heatmap.png is a thumbnail of the whole slide (same aspect ratio) with the scores painted on
  // it: placed at x 0, y 0 with width 1 it covers the slide (the first item, world width 1) and lines up
  // with it. As a world item it is drawn by OpenSeadragon's drawer, so it stays under the overlay canvas.
  var heat = {want: false, item: null, adding: false};
  var heatBox = document.getElementById("heatmap");
  var heatOpacity = document.getElementById("heatmap-opacity");
  function syncHeat() {
    if (!slideItem || heat.adding) return;  // before the slide opens ("open" calls again) or while loading
    if (heat.want && !heat.item) {
      heat.adding = true;
      viewer.addTiledImage({
        tileSource: {type: "image", url: "/heatmap.png"}, x: 0, y: 0, width: 1, opacity: Number(heatOpacity.value),
        success: function (e) { heat.adding = false; heat.item = e.item; syncHeat(); },  // unticked meanwhile?
        error: function (e) {
          heat.adding = false; heat.want = heatBox.checked = false;
          say("Cannot show the heat map: " + (e.message || "load failed"));
        }
      });
    } else if (!heat.want && heat.item) {
      viewer.world.removeItem(heat.item);
      heat.item = null;
    }
  }
  function setupHeat(available) {
    var label = document.getElementById("heatmap-label");
    heatBox.disabled = heatOpacity.disabled = !available;
    // on the label too: a disabled input gets no mouse events, so its own tooltip would not show
    label.title = heatBox.title = available ? "score-slide's heat map (heatmap.png) over the slide"
                            : "No heatmap.png in the report folder: run cytopipe score-slide again to make one";
    heatBox.addEventListener("change", function () { heat.want = heatBox.checked; syncHeat(); });
    heatOpacity.addEventListener("input", function () {
      if (heat.item) heat.item.setOpacity(Number(heatOpacity.value));
    });
  }

  // ------------------------------------------------------------------ details, gallery and labels
  function labelButtons(id) {
    var box = el("div", {"class": "labels", "data-cell-id": id});
    LABELS.forEach(function (l) {
      var b = el("button", {type: "button", "data-label": l[0], "aria-pressed": "false"}, l[1]);
      b.addEventListener("click", function (ev) { ev.stopPropagation(); setLabel(id, l[0]); });
      box.appendChild(b);
    });
    return box;
  }
  function refreshButtons() {
    document.querySelectorAll(".labels").forEach(function (box) {
      var cur = state.labels[box.dataset.cellId];
      box.querySelectorAll("button").forEach(function (b) {
        b.setAttribute("aria-pressed", cur && cur.label === b.dataset.label ? "true" : "false");
      });
    });
  }
  function fmt(v) { return typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(4)) : String(v); }
  function select(id) {
    var c = state.byId[id];
    state.selected = id;
    var box = document.getElementById("details");
    box.innerHTML = "";
    box.appendChild(el("h2", {}, "Cell " + id));
    var table = el("table", {id: "cell-scores"});
    ["category", "score", "call", "in_domain", "ood_score", "atypia", "diameter_um", "nc_ratio", "x", "y"].forEach(function (k) {
      if (c[k] === undefined || c[k] === null) return;
      var tr = el("tr"); tr.appendChild(el("td", {}, k)); tr.appendChild(el("td", {}, fmt(c[k]))); table.appendChild(tr);
    });
    box.appendChild(table);
    box.appendChild(labelButtons(id));
    document.querySelectorAll("#gallery li").forEach(function (li) {
      li.classList.toggle("current", li.dataset.cellId === id);
    });
    refreshButtons();
    draw();
  }
  function goTo(id) {
    var c = state.byId[id];
    if (!slideItem) return select(id);  // the slide is still opening: nowhere to pan yet
    var side = Math.max(c.x1 - c.x0, c.y1 - c.y0, 16) * 6;
    var rect = slideItem.imageToViewportRectangle(new OpenSeadragon.Rect(c.x - side / 2, c.y - side / 2, side, side));
    viewer.viewport.fitBounds(rect);
    select(id);
  }
  function setLabel(id, label) {
    var who = reviewer.value.trim();
    if (!who) { say("Enter your initials first."); reviewer.focus(); return; }
    var cur = state.labels[id];
    var next = cur && cur.label === label ? null : label;  // clicking the current label clears it
    fetch("/labels", {method: "POST", headers: {"Content-Type": "application/json"},
                      body: JSON.stringify({cell_id: id, label: next, reviewer: who})})
      .then(function (r) { return r.json().then(function (body) { return [r.ok, body]; }); })
      .then(function (res) {
        if (!res[0]) throw new Error(res[1].error || "not saved");
        if (next === null) delete state.labels[id];
        else state.labels[id] = {label: next, reviewer: who, timestamp: res[1].timestamp};
        say("Saved: cell " + id + (next ? " " + next : " cleared") + " (labels.csv)");
        refreshButtons(); draw();
      })
      .catch(function (err) { say("Not saved: " + err.message); });
  }
  function buildGallery(ids) {
    var list = document.getElementById("gallery");
    ids.forEach(function (id, i) {
      var c = state.byId[id];
      var li = el("li", {"data-cell-id": id, "data-rank": String(i + 1)});
      var img = el("img", {src: "/crop/" + encodeURIComponent(id) + ".jpeg", alt: "cell " + id, loading: "lazy", title: "show on the slide"});
      img.addEventListener("click", function () { goTo(id); });
      var text = el("div");
      text.appendChild(el("div", {}, "#" + (i + 1) + " cell " + id));
      text.appendChild(el("div", {}, "score " + fmt(c.score) + ", " + c.category));
      text.appendChild(labelButtons(id));
      li.appendChild(img); li.appendChild(text); list.appendChild(li);
    });
  }
  function buildToggles() {
    var box = document.getElementById("toggles");
    var counts = {};
    state.cells.forEach(function (c) { counts[c.category] = (counts[c.category] || 0) + 1; });
    Object.keys(COLOURS).forEach(function (cat) {
      state.shown[cat] = true;
      var label = el("label");
      var cb = el("input", {type: "checkbox", "data-category": cat});
      cb.checked = true;
      cb.addEventListener("change", function () { state.shown[cat] = cb.checked; draw(); });
      var sw = el("span", {"class": "swatch"}); sw.style.background = COLOURS[cat];
      label.appendChild(cb); label.appendChild(sw); label.appendChild(document.createTextNode(cat + " (" + (counts[cat] || 0) + ")"));
      box.appendChild(label);
    });
  }

  Promise.all([getJSON("/info.json"), getJSON("/cells.json"), getJSON("/labels.json")]).then(function (got) {
    var info = got[0];
    document.getElementById("slide-name").textContent = info.slide + " (" + info.n_cells + " cells)";
    loadCells(got[1]);
    state.labels = got[2];
    buildToggles();
    setupHeat(info.heatmap === true);
    buildGallery(info.gallery);
    refreshButtons();
    draw();
    document.body.dataset.ready = "1";
  }).catch(function (err) { say("Cannot load the report: " + err.message); });
})();
