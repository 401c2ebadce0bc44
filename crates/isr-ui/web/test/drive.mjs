// Drives the isr web console in a real headless Chromium (Debian's, through playwright-core), one step per
// run, for crates/isr-cli/tests/ui.rs. Prints one JSON object on stdout with what it saw.
//
//   node drive.mjs URL OUTDIR STEP [ARG]
//
// Steps:
//   resume-and-type PARCEL   open the console, resume PARCEL from the page, wait for its screen, type a command
//                            into it, suspend, check in with a message, and read the version history
//   resume-and-look PARCEL   open the console, resume PARCEL from the page, wait for its screen, take it in,
//                            suspend and check in
// Screenshots of the page go to OUTDIR (kept as test artefacts).
import { chromium } from 'playwright-core';
import { writeFileSync } from 'node:fs';

const [url, outDir, step, parcel] = process.argv.slice(2);
const CHROMIUM = process.env.ISR_CHROMIUM || '/usr/bin/chromium';
const result = { step, screenshots: [] };
const log = (...a) => console.error('[drive]', ...a);

const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-gpu'] });
const page = await browser.newPage({ viewport: { width: 1500, height: 1100 } });
page.on('console', (m) => log('page:', m.text()));
page.setDefaultTimeout(600_000);

async function shot(name) {
  const path = `${outDir}/${name}.png`;
  await page.screenshot({ path, fullPage: true });
  result.screenshots.push(path);
}

// What the VM's screen canvas holds: how many pixels are lit, and a coarse fingerprint of the text layout
// (which 8x16 cells hold any lit pixel), to compare screens without depending on the cursor's blink.
async function screenStats() {
  return page.evaluate(() => {
    const c = document.querySelector('#screen canvas');
    if (!c || c.width === 0) return null;
    const ctx = c.getContext('2d');
    const { data, width, height } = ctx.getImageData(0, 0, c.width, c.height);
    let lit = 0;
    const cols = Math.floor(width / 9) || 1, rows = Math.floor(height / 16) || 1;
    const cells = new Array(cols * rows).fill(0);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const i = (y * width + x) * 4;
        if (data[i] + data[i + 1] + data[i + 2] > 200) {
          lit++;
          const cx = Math.min(cols - 1, Math.floor(x / 9)), cy = Math.min(rows - 1, Math.floor(y / 16));
          cells[cy * cols + cx] = 1;
        }
      }
    }
    return { width, height, lit, cells: cells.join('') };
  });
}

async function waitFor(what, fn, timeoutMs = 600_000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await page.waitForTimeout(250);
  }
}

// Type as a person does: Shift held for shifted characters. (keyboard.type sends '$' as the Digit4 key without
// Shift, and noVNC forwards the key itself to QEMU, so the guest would see '4'.)
const SHIFTED = { '!': '1', '@': '2', '#': '3', '$': '4', '%': '5', '^': '6', '&': '7', '*': '8', '(': '9', ')': '0',
  '_': 'Minus', '+': 'Equal', '{': 'BracketLeft', '}': 'BracketRight', '|': 'Backslash', ':': 'Semicolon',
  '"': 'Quote', '<': 'Comma', '>': 'Period', '?': 'Slash', '~': 'Backquote' };
async function typeLikeAPerson(text) {
  for (const ch of text) {
    if (SHIFTED[ch]) {
      const base = SHIFTED[ch];
      await page.keyboard.press('Shift+' + (base.length === 1 ? 'Digit' + base : base));
    } else if (ch >= 'A' && ch <= 'Z') {
      await page.keyboard.press('Shift+Key' + ch);
    } else {
      await page.keyboard.type(ch);
    }
    await page.waitForTimeout(30);
  }
}

async function stateOf(name) {
  return page.evaluate(async (n) => {
    const r = await fetch('/api/state');
    const s = await r.json();
    return { parcel: s.parcels.find((p) => p.name === n), jobs: s.jobs };
  }, name);
}

async function clickOp(op) {
  const b = page.locator(`#detail button[data-op="${op}"]`);
  await waitFor(`the ${op} button to be enabled`, async () => !(await b.isDisabled()));
  await b.click();
}

async function lastJob(name, op) {
  return waitFor(`${op} of ${name} to end`, async () => {
    const { jobs } = await stateOf(name);
    const j = jobs.filter((j) => j.parcel === name && j.op === op).pop();
    return j && j.state !== 'running' ? j : null;
  });
}

async function resumeAndWaitForScreen(name) {
  await page.goto(url);
  await page.locator(`#parcels tr[data-name="${name}"]`).click();
  await shot(`${step}-1-console`);
  await clickOp('resume');
  // The screen appears once the VM runs; wait until the guest's shell prompt has drawn something.
  const stats = await waitFor('the guest screen', async () => {
    const s = await screenStats();
    return s && s.lit > 500 ? s : null;
  });
  // Let the guest settle (the shell prompt is the last thing it draws), then compare two looks.
  await waitFor('a steady screen', async () => {
    const a = await screenStats();
    await page.waitForTimeout(1500);
    const b = await screenStats();
    return a && b && a.cells === b.cells && a.lit > 500 ? b : null;
  });
  result.screen_first = stats;
}

async function suspendAndCheckin(name, message) {
  await clickOp('suspend');
  const r = await lastJob(name, 'resume');
  result.resume_job = r;
  await page.fill('#message', message);
  await clickOp('checkin');
  result.checkin_job = await lastJob(name, 'checkin');
  await page.waitForTimeout(1500);
  result.versions = await page.locator('#versions tbody tr').allInnerTexts();
  await shot(`${step}-4-checked-in`);
}

try {
  if (step === 'resume-and-type') {
    await resumeAndWaitForScreen(parcel);
    result.before_typing = await screenStats();
    await shot(`${step}-2-screen`);
    await page.locator('#screen canvas').click();
    // The shell reads the keyboard once an Enter gives a fresh prompt (a screen that changes): only then type.
    await waitFor('the guest shell to take keys', async () => {
      const before = await screenStats();
      await page.keyboard.press('Enter');
      await page.waitForTimeout(1500);
      const after = await screenStats();
      return before && after && before.cells !== after.cells;
    });
    await page.waitForTimeout(1000);
    result.before_typing = await screenStats();
    await typeLikeAPerson('echo typed-in-the-browser $((6*7)) > /dev/ttyS0; echo answer $((6*7))');
    await page.keyboard.press('Enter');
    result.after_typing = await waitFor('the answer on the screen', async () => {
      const s = await screenStats();
      return s && s.cells !== result.before_typing.cells ? s : null;
    });
    await page.waitForTimeout(2000);
    result.after_typing = await screenStats();
    await shot(`${step}-3-typed`);
    await suspendAndCheckin(parcel, 'typed in the browser');
  } else if (step === 'resume-and-look') {
    await resumeAndWaitForScreen(parcel);
    result.screen = await screenStats();
    await shot(`${step}-2-screen`);
    await suspendAndCheckin(parcel, 'looked in the browser');
  } else {
    throw new Error(`unknown step ${step}`);
  }
  result.ok = true;
} catch (e) {
  result.ok = false;
  result.error = String(e && e.stack ? e.stack : e);
  try { await shot(`${step}-failed`); } catch (_) {}
}
await browser.close();
writeFileSync(1, JSON.stringify(result) + '\n');
