// The driver matrix's Go clients (tests/compat): pgx, net/http, go-sql-driver/mysql and
// go-redis, each run through the broker with the everyday features its users rely on.
//
//	compat-go pgx|http|mysql|redis
//
// Settings come from COMPAT_* environment variables (tests/compat/drivers.py); every feature
// prints one JSON line {"feature", "ok", "detail"}, and the exit code is 0 when all ran.
package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"
)

// Every call gets this long: a hang fails the feature, not the whole matrix.
const featureTimeout = 30 * time.Second

func report(feature string, err error, detail string) {
	line := map[string]any{"feature": feature, "ok": err == nil, "detail": detail}
	if err != nil {
		line["detail"] = err.Error()
	}
	out, _ := json.Marshal(line)
	fmt.Println(string(out))
}

func env(name string) string {
	value := os.Getenv(name)
	if value == "" {
		fmt.Fprintf(os.Stderr, "%s is not set\n", name)
		os.Exit(2)
	}
	return value
}

func tlsConfig(certEnv, keyEnv string) *tls.Config {
	pool := x509.NewCertPool()
	ca, err := os.ReadFile(env("COMPAT_CA"))
	if err != nil || !pool.AppendCertsFromPEM(ca) {
		fmt.Fprintln(os.Stderr, "cannot read COMPAT_CA")
		os.Exit(2)
	}
	cert, err := tls.LoadX509KeyPair(env(certEnv), env(keyEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, "cannot load the SVID:", err)
		os.Exit(2)
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, ServerName: "localhost"}
}

func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), featureTimeout)
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: compat-go pgx|http|mysql|redis")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "pgx":
		runPgx()
	case "http":
		runHTTP()
	case "mysql":
		runMysql()
	case "redis":
		runRedis()
	default:
		fmt.Fprintln(os.Stderr, "unknown driver", os.Args[1])
		os.Exit(2)
	}
}

// ---------------------------------------------------------------------------- pgx

func runPgx() {
	c, cancel := ctx()
	defer cancel()
	conn, err := pgx.Connect(c, env("COMPAT_DSN"))
	report("connect", err, "")
	if err != nil {
		return
	}
	defer conn.Close(context.Background())

	var got int
	_, err = conn.Prepare(c, "add", "SELECT $1::int + $2::int")
	if err == nil {
		err = conn.QueryRow(c, "add", 40, 2).Scan(&got)
	}
	if err == nil && got != 42 {
		err = fmt.Errorf("prepared statement gave %d", got)
	}
	report("prepared", err, "")

	_, err = conn.Exec(c, "CREATE TEMP TABLE compat (n int, s text)")
	if err == nil {
		var tx pgx.Tx
		tx, err = conn.Begin(c)
		if err == nil {
			_, err = tx.Exec(c, "INSERT INTO compat VALUES (1, 'rolled back')")
			if err == nil {
				err = tx.Rollback(c)
			}
		}
	}
	var count int
	if err == nil {
		err = conn.QueryRow(c, "SELECT count(*) FROM compat").Scan(&count)
	}
	if err == nil && count != 0 {
		err = fmt.Errorf("the rolled back row is there")
	}
	report("transaction", err, "")

	rows := make([][]any, 1000)
	for i := range rows {
		rows[i] = []any{i, fmt.Sprintf("row %d", i)}
	}
	copied, err := conn.CopyFrom(c, pgx.Identifier{"compat"}, []string{"n", "s"}, pgx.CopyFromRows(rows))
	if err == nil && copied != 1000 {
		err = fmt.Errorf("copied %d rows", copied)
	}
	report("copy", err, "")

	var serverPid uint32
	_, err = conn.Exec(c, "LISTEN compat")
	if err == nil {
		_, err = conn.Exec(c, "NOTIFY compat, 'hello'")
	}
	if err == nil {
		err = conn.QueryRow(c, "SELECT pg_backend_pid()").Scan(&serverPid)
	}
	if err == nil {
		var n *pgconnNotification
		n, err = waitNotification(c, conn)
		if err == nil && (n.payload != "hello" || n.pid != serverPid || conn.PgConn().PID() != serverPid) {
			err = fmt.Errorf("notification %+v, server pid %d, driver pid %d", n, serverPid, conn.PgConn().PID())
		}
	}
	report("listen_notify", err, "")

	var total, n int64
	err = conn.QueryRow(c, "SELECT count(*), sum(g) FROM (SELECT generate_series(1, 200000) AS g) s").Scan(&n, &total)
	if err == nil {
		var big pgx.Rows
		big, err = conn.Query(c, "SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g")
		seen := 0
		for err == nil && big.Next() {
			seen++
		}
		if err == nil {
			err = big.Err()
		}
		if err == nil && seen != 100000 {
			err = fmt.Errorf("large result had %d rows", seen)
		}
	}
	report("large_result", err, "")

	// Last: pgx closes a connection whose context ends mid-query, after its CancelRequest.
	short, stop := context.WithTimeout(context.Background(), 500*time.Millisecond)
	started := time.Now()
	_, err = conn.Exec(short, "SELECT pg_sleep(20)")
	stop()
	var cancelErr error
	if err == nil {
		cancelErr = fmt.Errorf("pg_sleep(20) was not cancelled")
	} else if time.Since(started) > 10*time.Second {
		cancelErr = fmt.Errorf("cancelled only after %s", time.Since(started))
	}
	report("cancel", cancelErr, fmt.Sprint(err))

	denied, err := pgx.Connect(c, env("COMPAT_DENIED_DSN"))
	if err == nil {
		denied.Close(c)
		report("denied", fmt.Errorf("the denied identity connected"), "")
	} else {
		report("denied", nil, err.Error())
	}
}

type pgconnNotification struct {
	pid     uint32
	payload string
}

func waitNotification(c context.Context, conn *pgx.Conn) (*pgconnNotification, error) {
	n, err := conn.WaitForNotification(c)
	if err != nil {
		return nil, err
	}
	return &pgconnNotification{pid: n.PID, payload: n.Payload}, nil
}

// ---------------------------------------------------------------------------- net/http

func runHTTP() {
	base := env("COMPAT_URL")
	client := &http.Client{
		Timeout:   featureTimeout,
		Transport: &http.Transport{TLSClientConfig: tlsConfig("COMPAT_CERT", "COMPAT_KEY")},
	}
	resp, err := client.Get(base + "/compat/get")
	body := readBody(resp, err)
	report("get", check(resp, err, 200, body, "/compat/get"), "")

	resp, err = client.Post(base+"/compat/post", "application/json", strings.NewReader(`{"n": 42}`))
	body = readBody(resp, err)
	report("post", check(resp, err, 200, body, `{\"n\": 42}`), "")

	resp, err = client.Get(base + "/download?size=10000000")
	if err == nil {
		digest := sha256.New()
		_, err = io.Copy(digest, resp.Body)
		resp.Body.Close()
		if err == nil && resp.StatusCode != 200 {
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		report("large_result", err, hex.EncodeToString(digest.Sum(nil)))
	} else {
		report("large_result", err, "")
	}

	denied := &http.Client{
		Timeout:   featureTimeout,
		Transport: &http.Transport{TLSClientConfig: tlsConfig("COMPAT_DENIED_CERT", "COMPAT_DENIED_KEY")},
	}
	resp, err = denied.Get(base + "/compat/denied")
	body = readBody(resp, err)
	if err == nil && resp.StatusCode != 403 {
		err = fmt.Errorf("status %d", resp.StatusCode)
	}
	report("denied", err, body)
}

func readBody(resp *http.Response, err error) string {
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return string(data)
}

func check(resp *http.Response, err error, status int, body, want string) error {
	if err != nil {
		return err
	}
	if resp.StatusCode != status || !strings.Contains(body, want) {
		return fmt.Errorf("status %d body %q", resp.StatusCode, body)
	}
	return nil
}

// ---------------------------------------------------------------------------- mysql

func mysqlDB(certEnv, keyEnv string) (*sql.DB, error) {
	name := "sidekey-" + certEnv
	if err := mysql.RegisterTLSConfig(name, tlsConfig(certEnv, keyEnv)); err != nil {
		return nil, err
	}
	return sql.Open("mysql", fmt.Sprintf("any@tcp(%s)/%s?tls=%s", env("COMPAT_ADDRESS"), env("COMPAT_DATABASE"), name))
}

func runMysql() {
	c, cancel := ctx()
	defer cancel()
	db, err := mysqlDB("COMPAT_CERT", "COMPAT_KEY")
	if err == nil {
		err = db.PingContext(c)
	}
	report("connect", err, "")
	if err != nil {
		return
	}
	defer db.Close()
	db.SetMaxOpenConns(1)

	var got int
	stmt, err := db.PrepareContext(c, "SELECT ? + ?")
	if err == nil {
		err = stmt.QueryRowContext(c, 40, 2).Scan(&got)
		stmt.Close()
	}
	if err == nil && got != 42 {
		err = fmt.Errorf("prepared statement gave %d", got)
	}
	report("prepared", err, "")

	_, err = db.ExecContext(c, "CREATE TEMPORARY TABLE compat (n int, s varchar(40))")
	if err == nil {
		var tx *sql.Tx
		tx, err = db.BeginTx(c, nil)
		if err == nil {
			_, err = tx.ExecContext(c, "INSERT INTO compat VALUES (1, 'rolled back')")
			if err == nil {
				err = tx.Rollback()
			}
		}
	}
	var count int
	if err == nil {
		err = db.QueryRowContext(c, "SELECT count(*) FROM compat").Scan(&count)
	}
	if err == nil && count != 0 {
		err = fmt.Errorf("the rolled back row is there")
	}
	report("transaction", err, "")

	values := make([]string, 1000)
	args := make([]any, 0, 2000)
	for i := range values {
		values[i] = "(?, ?)"
		args = append(args, i, fmt.Sprintf("row %d", i))
	}
	res, err := db.ExecContext(c, "INSERT INTO compat VALUES "+strings.Join(values, ","), args...)
	if err == nil {
		var n int64
		n, err = res.RowsAffected()
		if err == nil && n != 1000 {
			err = fmt.Errorf("inserted %d rows", n)
		}
	}
	report("bulk_insert", err, "")

	short, stop := context.WithTimeout(context.Background(), 500*time.Millisecond)
	started := time.Now()
	_, err = db.ExecContext(short, "SELECT SLEEP(20)")
	stop()
	var timeoutErr error
	if err == nil || time.Since(started) > 10*time.Second {
		timeoutErr = fmt.Errorf("SLEEP(20) was not cut short: %v after %s", err, time.Since(started))
	}
	report("timeout", timeoutErr, fmt.Sprint(err))

	rows, err := db.QueryContext(c, "SELECT seq, REPEAT('x', 100) FROM seq_1_to_100000")
	seen := 0
	for err == nil && rows.Next() {
		seen++
	}
	if err == nil {
		err = rows.Err()
		rows.Close()
	}
	if err == nil && seen != 100000 {
		err = fmt.Errorf("large result had %d rows", seen)
	}
	report("large_result", err, "")

	denied, err := mysqlDB("COMPAT_DENIED_CERT", "COMPAT_DENIED_KEY")
	if err == nil {
		err = denied.PingContext(c)
		denied.Close()
	}
	if err == nil {
		report("denied", fmt.Errorf("the denied identity connected"), "")
	} else {
		report("denied", nil, err.Error())
	}
}

// ---------------------------------------------------------------------------- redis

func redisClient(certEnv, keyEnv string) *redis.Client {
	return redis.NewClient(&redis.Options{
		Addr:        env("COMPAT_ADDRESS"),
		TLSConfig:   tlsConfig(certEnv, keyEnv),
		ReadTimeout: featureTimeout,
		MaxRetries:  -1,
	})
}

func runRedis() {
	c, cancel := ctx()
	defer cancel()
	rdb := redisClient("COMPAT_CERT", "COMPAT_KEY")
	defer rdb.Close()
	err := rdb.Ping(c).Err()
	report("connect", err, "")
	if err != nil {
		return
	}
	key := fmt.Sprintf("compat:go:%d", time.Now().UnixNano())
	err = rdb.Set(c, key, "42", time.Minute).Err()
	var got string
	if err == nil {
		got, err = rdb.Get(c, key).Result()
	}
	if err == nil && got != "42" {
		err = fmt.Errorf("GET gave %q", got)
	}
	report("get_set", err, "")

	_, err = rdb.TxPipelined(c, func(pipe redis.Pipeliner) error {
		pipe.Incr(c, key)
		pipe.Incr(c, key)
		return nil
	})
	if err == nil {
		got, err = rdb.Get(c, key).Result()
	}
	if err == nil && got != "44" {
		err = fmt.Errorf("after MULTI/EXEC %q", got)
	}
	report("transaction", err, "")

	pipe := rdb.Pipeline()
	for i := 0; i < 1000; i++ {
		pipe.RPush(c, key+":list", i)
	}
	_, err = pipe.Exec(c)
	var length int64
	if err == nil {
		length, err = rdb.LLen(c, key+":list").Result()
	}
	if err == nil && length != 1000 {
		err = fmt.Errorf("list has %d items", length)
	}
	report("bulk_insert", err, "")

	sub := rdb.Subscribe(c, key+":chan")
	_, err = sub.Receive(c)
	if err == nil {
		err = rdb.Publish(c, key+":chan", "hello").Err()
	}
	if err == nil {
		var msg *redis.Message
		msg, err = sub.ReceiveMessage(c)
		if err == nil && msg.Payload != "hello" {
			err = fmt.Errorf("message %q", msg.Payload)
		}
	}
	sub.Close()
	report("pubsub", err, "")

	started := time.Now()
	err = rdb.BLPop(c, 500*time.Millisecond, key+":empty").Err()
	var timeoutErr error
	if err != redis.Nil || time.Since(started) > 10*time.Second {
		timeoutErr = fmt.Errorf("BLPOP 0.5 s gave %v after %s", err, time.Since(started))
	}
	report("timeout", timeoutErr, "")

	big := strings.Repeat("x", 5_000_000)
	err = rdb.Set(c, key+":big", big, time.Minute).Err()
	if err == nil {
		got, err = rdb.Get(c, key+":big").Result()
	}
	if err == nil && got != big {
		err = fmt.Errorf("large value came back with %d bytes", len(got))
	}
	report("large_result", err, "")
	rdb.Del(c, key, key+":list", key+":big")

	denied := redisClient("COMPAT_DENIED_CERT", "COMPAT_DENIED_KEY")
	err = denied.Ping(c).Err()
	denied.Close()
	if err == nil {
		report("denied", fmt.Errorf("the denied identity was served"), "")
	} else {
		report("denied", nil, err.Error())
	}
}
