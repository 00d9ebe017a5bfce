/** Structured JSON logs on stdout (pino, no transports: they need worker threads and files). */
import { type Logger, pino } from "pino";

export type { Logger };

export function createLogger(
  component: string,
  options: { level?: string; destination?: NodeJS.WritableStream } = {},
): Logger {
  return pino(
    {
      name: component,
      level: options.level ?? process.env.SALLYPORT_LOG_LEVEL ?? "info",
      base: { component },
    },
    options.destination ?? process.stdout,
  );
}

/** A logger that drops everything: for tests that do not look at logs. */
export const silentLogger: Logger = pino({ level: "silent" });
