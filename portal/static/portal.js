// The one script: times in the viewer's own time zone, UTC kept on hover (title).
// Without it the page reads the same, in UTC.
document.querySelectorAll("time[datetime]").forEach((el) => {
  const at = new Date(el.getAttribute("datetime"));
  if (Number.isNaN(at.getTime())) return;
  el.textContent = at.toLocaleString(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
    timeZoneName: "short",
  });
});
