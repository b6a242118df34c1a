package models

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// LogWriterOptions tune a LogWriter. Zero values select the defaults.
type LogWriterOptions struct {
	// QueueSize is how many records may wait for the database; when the
	// queue is full Record drops. Default 10000.
	QueueSize int
	// BatchSize is the most records written in one transaction. Default 500.
	BatchSize int
	// FlushInterval is the longest a record waits for its batch to fill.
	// Default 1s.
	FlushInterval time.Duration
	// Retries is how many more times a failed batch is tried before it is
	// dropped; 0 selects 3, a negative value none.
	Retries int
	// RetryBackoff is the pause before the first retry, doubled for each
	// further one. Default 200ms.
	RetryBackoff time.Duration
	// WriteTimeout bounds one attempt at a batch. Default 10s.
	WriteTimeout time.Duration
	// Logger receives batch failures; nil discards them.
	Logger *slog.Logger
	// OnBatch, if set, is called by the writer goroutine after each batch
	// with the records written and dropped. It must not block for long.
	OnBatch func(written, dropped int)
}

func (o *LogWriterOptions) setDefaults() {
	if o.QueueSize <= 0 {
		o.QueueSize = 10000
	}
	if o.BatchSize <= 0 {
		o.BatchSize = 500
	}
	if o.FlushInterval <= 0 {
		o.FlushInterval = time.Second
	}
	if o.Retries == 0 {
		o.Retries = 3
	}
	if o.RetryBackoff <= 0 {
		o.RetryBackoff = 200 * time.Millisecond
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// LogWriter writes request logs and their roll-ups in the background, so a
// slow or absent database never slows a proxied request: Record only puts
// the record on a bounded queue, and one goroutine writes batches.
type LogWriter struct {
	store *Store
	opts  LogWriterOptions
	queue chan RequestLog

	// mu orders Record's send against Close's close(queue): senders hold
	// it shared, Close exclusively, so nothing is sent on a closed channel.
	mu     sync.RWMutex
	closed bool

	// abort cancels in-flight writes when Close runs out of time.
	abortCtx context.Context
	abort    context.CancelFunc
	done     chan struct{}

	written atomic.Uint64
	dropped atomic.Uint64
}

// NewLogWriter starts the writer goroutine. Stop it with Close.
func NewLogWriter(s *Store, opts LogWriterOptions) *LogWriter {
	opts.setDefaults()
	w := &LogWriter{
		store: s,
		opts:  opts,
		queue: make(chan RequestLog, opts.QueueSize),
		done:  make(chan struct{}),
	}
	w.abortCtx, w.abort = context.WithCancel(context.Background())
	go w.run()
	return w
}

// Record queues r for writing and never blocks. It reports false when r was
// dropped because the queue is full or the writer closed; Dropped counts
// those. A zero CreatedAt is set to now.
func (w *LogWriter) Record(r RequestLog) bool {
	if r.CreatedAt.IsZero() {
		r.CreatedAt = w.store.Now()
	}
	sanitize(&r)
	w.mu.RLock()
	defer w.mu.RUnlock()
	if !w.closed {
		select {
		case w.queue <- r:
			return true
		default:
		}
	}
	w.dropped.Add(1)
	return false
}

// Written counts records committed to the database.
func (w *LogWriter) Written() uint64 { return w.written.Load() }

// Dropped counts records lost: queue full, writer closed, or their batch
// failed every retry.
func (w *LogWriter) Dropped() uint64 { return w.dropped.Load() }

// QueueLen is the number of records waiting for the writer goroutine.
func (w *LogWriter) QueueLen() int { return len(w.queue) }

// Close stops accepting records and returns once everything queued is
// written (or dropped after its retries). If ctx ends first, pending writes
// are abandoned, the rest counted as dropped, and ctx's error returned.
// Calling Close again waits for the same end.
func (w *LogWriter) Close(ctx context.Context) error {
	w.mu.Lock()
	if !w.closed {
		w.closed = true
		close(w.queue)
	}
	w.mu.Unlock()
	select {
	case <-w.done:
		return nil
	case <-ctx.Done():
		w.abort()
		<-w.done
		return fmt.Errorf("models: log writer close: %w", ctx.Err())
	}
}

// run collects batches until the queue closes: a batch is written when it
// is full or when FlushInterval passes, whichever comes first.
func (w *LogWriter) run() {
	defer close(w.done)
	defer w.abort()
	batch := make([]RequestLog, 0, w.opts.BatchSize)
	ticker := time.NewTicker(w.opts.FlushInterval)
	defer ticker.Stop()
	for {
		select {
		case r, ok := <-w.queue:
			if !ok {
				w.flush(batch)
				return
			}
			batch = append(batch, r)
			if len(batch) >= w.opts.BatchSize {
				w.flush(batch)
				batch = batch[:0]
			}
		case <-ticker.C:
			w.flush(batch)
			batch = batch[:0]
		}
	}
}

// flush writes one batch, retrying with backoff, and accounts for it.
func (w *LogWriter) flush(batch []RequestLog) {
	if len(batch) == 0 {
		return
	}
	written, dropped := len(batch), 0
	if err := w.writeWithRetry(batch); err != nil {
		written, dropped = 0, len(batch)
		w.opts.Logger.Error("request log batch dropped",
			slog.Int("records", len(batch)), slog.Any("error", err))
	}
	w.written.Add(uint64(written))
	w.dropped.Add(uint64(dropped))
	if w.opts.OnBatch != nil {
		w.opts.OnBatch(written, dropped)
	}
}

func (w *LogWriter) writeWithRetry(batch []RequestLog) error {
	backoff := w.opts.RetryBackoff
	for attempt := 0; ; attempt++ {
		err := w.writeOnce(batch)
		if err == nil || attempt >= w.opts.Retries || w.abortCtx.Err() != nil {
			return err
		}
		w.opts.Logger.Warn("request log batch failed, retrying",
			slog.Int("records", len(batch)), slog.Int("attempt", attempt+1), slog.Any("error", err))
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-w.abortCtx.Done():
			t.Stop()
			return err
		}
		backoff *= 2
	}
}

// writeOnce is one attempt. A timeout during COMMIT may have committed the
// batch anyway; its retry then writes it twice. That rare duplicate is the
// price of never blocking on a database that may be gone.
func (w *LogWriter) writeOnce(batch []RequestLog) error {
	ctx, cancel := context.WithTimeout(w.abortCtx, w.opts.WriteTimeout)
	defer cancel()
	return w.store.insertRequestLogs(ctx, batch)
}

// rowsPerStatement bounds the rows of one roll-up upsert. Far below the
// bind variable limits (SQLite 32766, PostgreSQL 65535), because the SQLite
// driver matches each parameter by a linear search of all arguments:
// binding costs grow with the square of the parameters per statement.
const rowsPerStatement = 100

// maxTextBytes caps each text field of a record, so one huge header or
// error message cannot fill memory or disk.
const maxTextBytes = 1024

// sanitize makes a record storable. PostgreSQL rejects NUL bytes and
// invalid UTF-8 in TEXT, and a User-Agent or model name can carry either;
// one such record would otherwise fail its whole batch. Times are stored
// in UTC at microsecond precision, PostgreSQL's, so both databases hold the
// same value and keyset cursors compare exactly.
func sanitize(r *RequestLog) {
	r.ID = 0
	r.CreatedAt = r.CreatedAt.UTC().Truncate(time.Microsecond)
	for _, p := range [...]*string{
		&r.Client, &r.Method, &r.Path, &r.Model, &r.Outcome, &r.UpstreamRequestID,
		&r.IdempotencyKey, &r.Error, &r.ClientIP, &r.UserAgent,
	} {
		*p = cleanText(*p)
	}
}

func cleanText(s string) string {
	if len(s) <= maxTextBytes && utf8.ValidString(s) && strings.IndexByte(s, 0) < 0 {
		return s
	}
	if len(s) > maxTextBytes {
		// Clone, so the record does not pin the caller's larger string.
		s = strings.Clone(s[:maxTextBytes])
	}
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "")
}
