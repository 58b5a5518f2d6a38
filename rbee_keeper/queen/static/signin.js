// Reached through a link from another site, a browser withholds the SameSite=Strict cookie
// on that first request: ask again from here (same site) and go on if signed in already.
const response = await fetch("/session", { credentials: "same-origin" });
const session = response.ok ? await response.json() : {};
if (session.signed_in && !document.getElementById("message").textContent) location.replace("/");
