// Events per second over the last minute, as inline SVG bars: one bucket per second, redrawn
// once a second.

const SECONDS = 60;
const SVG = "http://www.w3.org/2000/svg";

/** Draws into `svg` and writes the last full second's rate into `label`; returns `count()`. */
export function rateChart(svg, label) {
  const buckets = new Array(SECONDS).fill(0);
  let second = Math.floor(Date.now() / 1000);
  svg.setAttribute("viewBox", `0 0 ${SECONDS} 20`);
  svg.setAttribute("preserveAspectRatio", "none");
  const bars = buckets.map((_, at) => {
    const bar = document.createElementNS(SVG, "rect");
    bar.setAttribute("x", String(at + 0.1));
    bar.setAttribute("width", "0.8");
    svg.append(bar);
    return bar;
  });
  const roll = () => {
    const now = Math.floor(Date.now() / 1000);
    const steps = Math.min(now - second, SECONDS);
    for (let i = 0; i < steps; i++) {
      buckets.shift();
      buckets.push(0);
    }
    second = now;
  };
  const draw = () => {
    roll();
    const peak = Math.max(1, ...buckets);
    buckets.forEach((n, at) => {
      const height = (n / peak) * 20;
      bars[at].setAttribute("y", String(20 - height));
      bars[at].setAttribute("height", String(height));
    });
    label.textContent = `${buckets[SECONDS - 2]}/s`;
    svg.parentElement.title = `events per second over the last minute (peak ${Math.max(...buckets)}/s)`;
  };
  draw();
  setInterval(draw, 1000);
  return () => {
    roll();
    buckets[SECONDS - 1] += 1;
  };
}
