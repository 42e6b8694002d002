// Fetch a fresh rendering of <main> every few seconds; say so when this gateway stops answering.
"use strict";
const main = document.getElementById("status");
const banner = document.getElementById("unreachable");
let failingSince = null;
async function refresh() {
  try {
    const response = await fetch("/status/main", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    main.innerHTML = await response.text();
    main.dataset.refreshes = String(Number(main.dataset.refreshes || 0) + 1);
    failingSince = null;
    banner.hidden = true;
  } catch (error) {
    failingSince = failingSince || new Date();
    banner.textContent = "This gateway has not answered since " + failingSince.toLocaleTimeString() +
      " (" + error.message + "): the figures below are from before.";
    banner.hidden = false;
  }
}
setInterval(refresh, 1000 * Number(main.dataset.refreshSeconds || 2));
