// Tooltips and "jump to the moment" for the session report. Text is only ever set with textContent.
(function () {
  "use strict";
  var tip = document.getElementById("tip");
  function show(el, x, y) {
    tip.textContent = el.getAttribute("data-tip");
    tip.hidden = false;
    var w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = Math.min(x + 14, window.innerWidth - w - 8) + "px";
    tip.style.top = (y + 16 + h > window.innerHeight ? y - h - 10 : y + 16) + "px";
  }
  document.addEventListener("mousemove", function (ev) {
    var el = ev.target.closest ? ev.target.closest("[data-tip]") : null;
    if (el) { show(el, ev.clientX, ev.clientY); } else { tip.hidden = true; }
  });
  document.addEventListener("click", function (ev) {
    var a = ev.target.closest ? ev.target.closest("a.jump") : null;
    if (!a) { return; }
    var mark = document.getElementById(a.getAttribute("data-mark"));
    if (!mark) { return; }
    ev.preventDefault();
    var old = document.querySelectorAll(".m.hl");
    for (var i = 0; i < old.length; i++) { old[i].classList.remove("hl"); }
    mark.classList.add("hl");
    var box = document.getElementById("timeline");
    var r = mark.getBoundingClientRect(), b = box.getBoundingClientRect();
    if (r.left < b.left + 240 || r.right > b.right) { box.scrollLeft += r.left - b.left - b.width / 2; }
    box.scrollIntoView({ behavior: "smooth", block: "center" });
    history.replaceState(null, "", "#" + mark.id);
  });
})();
