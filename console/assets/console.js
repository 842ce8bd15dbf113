// Tally console: live fragments. An element with data-live="URL" (and data-every="MS") has
// its content replaced by GET URL every few seconds; nothing else on the page runs script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const element of document.querySelectorAll("[data-live]")) {
    const every = Number(element.dataset.every || 2000);
    const refresh = async () => {
      try {
        const response = await fetch(element.dataset.live, { credentials: "same-origin" });
        if (response.redirected || response.status === 401) {
          window.location.reload();
          return;
        }
        element.innerHTML = await response.text();
        element.dataset.refreshedAt = new Date().toISOString();
      } catch (error) {
        element.dataset.error = String(error);
      }
    };
    setInterval(refresh, every);
  }
});
